"""Test aids that the demo and the benchmarks use too: tiny random models built from configs and loaded
through `from_pretrained` like real ones, and generated sample documents. Never imported by production code
paths other than the demo."""
