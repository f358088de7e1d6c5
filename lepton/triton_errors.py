"""Lepton errors as Triton Python-backend errors (importable only inside the backend stub)."""

from __future__ import annotations

from lepton.errors import ErrorKind


def triton_error(kind: ErrorKind, message: str):
    """A pb_utils.TritonError with the code for kind (INVALID_ARG, UNAVAILABLE, INTERNAL)."""
    # NOTE: imported here: the module exists only in the stub, and TritonError only once it runs a model.
    import triton_python_backend_utils as pb_utils

    codes = {
        ErrorKind.INVALID: pb_utils.TritonError.INVALID_ARG,
        ErrorKind.BUSY: pb_utils.TritonError.UNAVAILABLE,
        ErrorKind.INTERNAL: pb_utils.TritonError.INTERNAL,
    }
    # NOTE: a message that echoes a lone surrogate cannot cross into C++ (the error itself would fail).
    return pb_utils.TritonError(message.encode("utf-8", "backslashreplace").decode("utf-8"), codes[kind])
