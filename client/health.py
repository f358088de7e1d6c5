"""Health checks with tritonclient: server live, server ready, model ready."""

from __future__ import annotations

import http.client
from dataclasses import dataclass

from tritonclient.utils import InferenceServerException

from client.address import host_port
from client.errors import ClientError


@dataclass(frozen=True)
class Check:
    """One health check and its outcome; detail says why it failed, when it could not be asked."""

    name: str
    ok: bool
    detail: str = ""


def check_health(protocol: str, url: str, model: str, timeout: float | None = None) -> list[Check]:
    """Ask server live, server ready and model ready, in order; stop at the first that cannot be asked."""
    client = _client(protocol, url, timeout)
    probes = (
        ("server live", client.is_server_live),
        ("server ready", client.is_server_ready),
        (f"model '{model}' ready", lambda: client.is_model_ready(model)),
    )
    checks = []
    try:
        for name, probe in probes:
            check = _ask(name, probe)
            checks.append(check)
            if check.detail:
                break
    finally:
        client.close()
    return checks


def _client(protocol: str, url: str, timeout: float | None):
    # NOTE: imported here: tritonclient.http pulls in gevent, which generate does not need.
    if protocol == "grpc":
        import tritonclient.grpc as grpcclient

        return _GrpcTimeout(grpcclient.InferenceServerClient(url), timeout)
    if protocol == "http":
        import tritonclient.http as httpclient

        options = {} if timeout is None else {"connection_timeout": timeout, "network_timeout": timeout}
        return httpclient.InferenceServerClient(host_port(url), **options)
    raise ClientError(f"unknown protocol {protocol!r}; use grpc or http")


def _ask(name: str, probe) -> Check:
    try:
        return Check(name, bool(probe()))
    except InferenceServerException as exc:
        return Check(name, False, exc.message() or str(exc))
    except OSError as exc:
        return Check(name, False, f"cannot connect: {exc}")
    except http.client.HTTPException as exc:
        return Check(name, False, f"not an HTTP answer ({type(exc).__name__})")


class _GrpcTimeout:
    """The gRPC client's health calls with a per-call timeout."""

    def __init__(self, client, timeout: float | None) -> None:
        self.client, self.timeout = client, timeout

    def is_server_live(self) -> bool:
        return self.client.is_server_live(client_timeout=self.timeout)

    def is_server_ready(self) -> bool:
        return self.client.is_server_ready(client_timeout=self.timeout)

    def is_model_ready(self, model: str) -> bool:
        return self.client.is_model_ready(model, client_timeout=self.timeout)

    def close(self) -> None:
        self.client.close()
