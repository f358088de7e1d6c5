"""An OpenAI-compatible HTTP API in front of Lepton's Triton model, over Triton's gRPC client."""
