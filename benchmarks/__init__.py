"""Serving benchmarks: Lepton behind a real tritonserver against a transformers baseline."""
