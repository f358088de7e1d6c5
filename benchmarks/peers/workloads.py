"""The workloads every system runs, built once so that each sees the very same prompts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from benchmarks.workload import (
    PromptFactory, RequestSpec, fixed_requests, poisson_requests, shared_prefix_requests,
)


@dataclass(frozen=True)
class Workload:
    """Requests and how they are sent: `concurrency` in flight (closed loop) or at arrival_s (open)."""

    name: str
    title: str
    specs: tuple[RequestSpec, ...]
    concurrency: int | None  # None: open loop, each spec sent at its arrival_s
    warmup: tuple[RequestSpec, ...] = ()  # sent one at a time before the timed requests, not measured

    @property
    def max_context(self) -> int:
        """The longest prompt + output of one request (what one server slot must hold)."""
        return max(s.num_prompt_tokens + s.max_tokens for s in self.specs)


@dataclass(frozen=True)
class WorkloadOptions:
    """Sizes of the workloads; --quick shrinks the counts, not the shapes of W1 and W2."""

    prompt_tokens: int = 128
    output_tokens: int = 128
    w1_requests: int = 4
    w2_requests: int = 16
    c64_requests: int = 64
    poisson_requests: int = 24
    poisson_rate: float = 1.0
    poisson_prompt: tuple[int, int] = (32, 512)
    poisson_output: tuple[int, int] = (16, 128)
    prefix_requests: int = 16
    prefix_tokens: int = 1024
    prefix_suffix_tokens: int = 16
    prefix_output_tokens: int = 32
    seed: int = 0


QUICK = WorkloadOptions(output_tokens=16, w1_requests=2, w2_requests=4, c64_requests=8, poisson_requests=4,
                        poisson_rate=4.0, poisson_prompt=(32, 128), poisson_output=(4, 16), prefix_requests=4,
                        prefix_tokens=256, prefix_output_tokens=4)
NAMES = ("w1", "w2", "c64", "poisson", "prefix", "prefix_warm")


def build_workloads(factory: PromptFactory, o: WorkloadOptions) -> dict[str, Workload]:
    """W1, W2, 64 concurrent, staggered Poisson arrivals, shared prefix (cold, and cached by an earlier request):
    one Workload each."""
    fixed = lambda tag, n: tuple(fixed_requests(factory, tag, n, o.prompt_tokens, o.output_tokens))  # noqa: E731
    c64 = fixed("c64", o.c64_requests)
    poisson = poisson_requests(factory, o.poisson_requests, o.poisson_rate, o.poisson_prompt, o.poisson_output, o.seed)
    prefix = shared_prefix_requests(factory, o.prefix_requests, o.prefix_tokens, o.prefix_suffix_tokens,
                                    o.prefix_output_tokens)
    # NOTE: another prefix, so the cold run cannot have cached it; its first request (one output token) goes first
    warm = shared_prefix_requests(factory, o.prefix_requests + 1, o.prefix_tokens, o.prefix_suffix_tokens,
                                  o.prefix_output_tokens, tag="prefix_warm")
    return {
        "w1": Workload("w1", f"W1: one stream, {o.prompt_tokens}-token prompt, {o.output_tokens} output tokens",
                       fixed("w1", o.w1_requests), 1),
        "w2": Workload("w2", f"W2: {o.w2_requests} requests at once", fixed("w2", o.w2_requests), o.w2_requests),
        "c64": Workload("c64", f"{len(c64)} requests at once", c64, len(c64)),
        "poisson": Workload("poisson", f"{o.poisson_requests} staggered Poisson arrivals at {o.poisson_rate}/s, "
                            f"prompts {o.poisson_prompt[0]}–{o.poisson_prompt[1]}, outputs "
                            f"{o.poisson_output[0]}–{o.poisson_output[1]} tokens", tuple(poisson), None),
        "prefix": Workload("prefix", f"{o.prefix_requests} requests at once behind one shared {o.prefix_tokens}-token "
                           f"prefix (+{o.prefix_suffix_tokens} each, {o.prefix_output_tokens} output tokens)",
                           tuple(prefix), len(prefix)),
        "prefix_warm": Workload("prefix_warm", f"the same behind another {o.prefix_tokens}-token prefix, sent after one "
                                f"request behind it has finished (a system prompt that earlier traffic cached)",
                                tuple(warm[1:]), len(warm) - 1, warmup=(dataclasses.replace(warm[0], max_tokens=1),)),
    }


def with_fresh_prompts(factory: PromptFactory, workload: Workload, tag: str) -> Workload:
    """The same closed-loop workload (as many requests, prompts as long, as many output tokens) with prompts no
    earlier run sent, so that no prefix cache holds them."""
    first = workload.specs[0]
    specs = tuple(fixed_requests(factory, tag, len(workload.specs), first.num_prompt_tokens, first.max_tokens))
    return dataclasses.replace(workload, specs=specs, warmup=())


def token_ids(factory: PromptFactory, spec: RequestSpec) -> list[int]:
    """The prompt's token ids as Lepton's tokenizer makes them (BOS included); peers get these ids."""
    return factory.tokenizer.encode(spec.prompt).ids
