"""Lepton side by side with its CPU peers (llama.cpp's server, onnxruntime-genai): `make bench-peers`."""
