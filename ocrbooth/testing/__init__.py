"""Measurement aids shared by the tests and the benchmarks: the OCR accuracy corpus and its CER."""
