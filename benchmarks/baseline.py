"""Baseline: the same model with transformers' generate, one request at a time, in this process."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.loadgen import RequestRecord
from benchmarks.workload import RequestSpec


class _TimingStreamer:
    """A generate() streamer that only timestamps: put() gets the prompt once, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_baseline(model_dir: Path, specs: list[RequestSpec], tokenizer, num_threads: int = 0) -> list[RequestRecord]:
    """Greedy generate of exactly max_tokens tokens per spec (eos ignored through min_new_tokens).

    TTFT is the time from calling generate() to the streamer receiving the first new token (the
    prefill plus one sampling step); each later put() gives one inter-token gap. num_threads: torch
    intra-op threads, chosen as the engine chooses them (0 = all cores but one).
    """
    import torch
    from transformers import LlamaForCausalLM

    from lepton.config import RunnerConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(RunnerConfig(num_threads=num_threads).compute_threads)

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    records = []
    with torch.inference_mode():
        _generate(model, tokenizer.encode(specs[0].prompt).ids[:16], 4)  # warm-up, not measured
        for spec in specs:
            ids = tokenizer.encode(spec.prompt).ids
            streamer = _TimingStreamer()
            record = RequestRecord(spec, num_input_tokens=len(ids))
            record.sent_s = time.perf_counter()
            output = _generate(model, ids, spec.max_tokens, streamer)
            record.done_s = time.perf_counter()
            record.responses = [(t, n, 1) for n, t in enumerate(streamer.times[1:], start=1)]
            record.finish_reason = "length" if output.shape[1] - len(ids) == spec.max_tokens else "stop"
            records.append(record)
    torch.set_num_threads(threads)
    return records


def _generate(model, ids: list[int], max_tokens: int, streamer=None):
    import torch

    return model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
        streamer=streamer, pad_token_id=model.config.pad_token_id,
    )
