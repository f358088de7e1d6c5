"""The server's Prometheus endpoint: one scrape, or a background sampler during a run."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from benchmarks.loadgen import InFlight
from client.metrics import scrape


@dataclass(frozen=True)
class KVSample:
    """The server's KV gauges next to what the client knows at the same moment."""

    t: float  # time.perf_counter()
    kv_blocks_used: int
    num_running: int
    num_waiting: int
    client_in_flight: int  # requests sent and not finished
    client_decoding: int  # of those, requests that already received a token
    client_tokens_stored: int  # sum over decoding requests of prompt + received - 1


class MetricsSampler:
    """Scrapes the metrics endpoint every interval_s in a thread until stopped."""

    def __init__(self, url: str, inflight: InFlight, interval_s: float = 0.1) -> None:
        self.url, self.inflight, self.interval_s = url, inflight, interval_s
        self.samples: list[KVSample] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)

    def __enter__(self) -> "MetricsSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                values = scrape(self.url)
            except OSError:
                self.errors += 1
                continue
            # NOTE: the KV of the newest token is written by the next step, hence the - 1.
            seqs = self.inflight.snapshot()
            decoding = [(p, n) for p, n in seqs if n > 0]
            self.samples.append(KVSample(
                t=time.perf_counter(),
                kv_blocks_used=int(values.get("lepton_kv_blocks_used", 0)),
                num_running=int(values.get("lepton_num_running", 0)),
                num_waiting=int(values.get("lepton_num_waiting", 0)),
                client_in_flight=len(seqs),
                client_decoding=len(decoding),
                client_tokens_stored=sum(p + n - 1 for p, n in decoding),
            ))
