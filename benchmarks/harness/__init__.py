"""What every benchmark shares: the machine description (`machine`), interleaved timing
(`timing`), the peak resident memory of a fresh process (`memory`) and the results writer
(`report`). Importing it is cheap: no torch, no onnxruntime until a function needs them."""
