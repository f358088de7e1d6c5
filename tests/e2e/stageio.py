"""tritonclient calls to the stateless models (tokenizer, embeddings): batched tensors in and out."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype


def as_tensor(value) -> np.ndarray:
    """[batch, ...] numpy input: strings become a BYTES column, arrays pass as they are."""
    if isinstance(value, np.ndarray):
        return value
    return np.array([[v.encode() if isinstance(v, str) else v] for v in value], dtype=np.object_)


def infer(url: str, model: str, inputs: dict, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One request; raises InferenceServerException on an error response."""
    client = grpcclient.InferenceServerClient(url)
    try:
        tensors = []
        for name, value in inputs.items():
            array = as_tensor(value)
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs])
        return {name: result.as_numpy(name) for name in outputs}
    finally:
        client.close()


def batch_stats(url: str, model: str) -> dict[int, int]:
    """Triton's executions of model by batch size: {batch size: executions}."""
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
