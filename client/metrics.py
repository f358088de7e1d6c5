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


def wait_idle(metrics_url: str, timeout: float = 20.0, poll_s: float = 0.1) -> dict[str, float]:
    """Poll until no request runs or waits and no KV block is held; the last samples, or AssertionError."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        values = scrape(metrics_url)
        if values.get("lepton_num_running") == 0 and values.get("lepton_num_waiting") == 0 \
                and values.get("lepton_kv_blocks_used") == 0:
            return values
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle after {timeout} s: {values}")
        time.sleep(poll_s)
