"""Lepton's own samples from a server's Prometheus metrics endpoint."""

from __future__ import annotations

import urllib.request


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """lepton_* samples by metric name (labels dropped), e.g. from http://127.0.0.1:8002/metrics."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        lines = response.read().decode().splitlines()
    values = {}
    for line in lines:
        if line.startswith("lepton_"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values
