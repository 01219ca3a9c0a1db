"""vaeinfer's benchmarks, run from the repository checkout (not installed with the wheel):

    python -m benchmarks.<group>.<name> --help

Groups: `speed` (timings and memory), `evaluation` (model quality), `stress` (fuzzing, soak, the
browser check); `harness` is what they share. See benchmarks/README.md.
"""
