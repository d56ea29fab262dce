"""Test aids that the demo and the benchmarks use too: tiny random models built from configs and loaded
through `from_pretrained` like real ones, generated sample documents, and the OCR accuracy corpus with its CER.
Never imported by production code paths other than the demo."""
