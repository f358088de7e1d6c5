"""Lepton's own samples from a server's Prometheus metrics endpoint."""

from __future__ import annotations

import re
import urllib.request

ENGINE_LABEL = "engine"  # the label that tells the lepton model's engine instances apart
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url: str, timeout: float = 10.0) -> dict[str, float]:
    """The server's lepton_* figures by metric name, summed over its engine instances (other labels
    dropped), e.g. from http://127.0.0.1:8002/metrics."""
    return server_totals(scrape_engines(url, timeout))


def server_totals(engines: dict[str, dict[str, float]]) -> dict[str, float]:
    """The sum over engine instances of each figure; the KV cache usage of them all together."""
    values: dict[str, float] = {}
    for engine in engines.values():
        for name, value in engine.items():
            values[name] = values.get(name, 0.0) + value
    if values.get("lepton_kv_blocks_total"):
        # NOTE: a ratio does not sum; the server's usage is its blocks used over its blocks.
        values["lepton_kv_cache_usage"] = values["lepton_kv_blocks_used"] / values["lepton_kv_blocks_total"]
    return values


def scrape_engines(url: str, timeout: float = 10.0) -> dict[str, dict[str, float]]:
    """lepton_* samples by engine instance (the `engine` label; "" when unlabelled), then by name."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_engines(response.read().decode())


def parse_engines(text: str) -> dict[str, dict[str, float]]:
    """scrape_engines on the text of a Prometheus exposition."""
    engines: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("lepton_"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            engine = dict(_LABEL.findall(labels)).get(ENGINE_LABEL, "")
            engines.setdefault(engine, {})[name] = float(value)
    return engines


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
