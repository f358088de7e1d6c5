"""Server addresses: HOST:PORT, as --url takes them."""

from __future__ import annotations

from client.errors import ClientError


def split_url(url: str) -> tuple[str, int | None]:
    """HOST:PORT (an http:// prefix is allowed; no port means the scheme's default) as (host, port)."""
    address = url.split("://", 1)[-1].rstrip("/")
    host, colon, port = address.rpartition(":")
    if not colon or "]" in port:
        return address.strip("[]"), None
    if not host or not port.isdigit():
        raise ClientError(f"invalid url {url!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def host_port(url: str) -> str:
    """url without scheme or trailing slash, checked; what tritonclient.http expects."""
    host, port = split_url(url)
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"
