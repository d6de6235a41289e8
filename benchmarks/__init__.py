"""rdzv-store benchmarks: ours vs torch's stores in one run. Run ``python -m benchmarks --help``."""
