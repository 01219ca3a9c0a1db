"""Speed: latency, throughput, overhead, cold start and memory of the runtime, against its peers."""
