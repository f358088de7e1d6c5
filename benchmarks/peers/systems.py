"""Each system under test (a peer or a Lepton variant) run through every workload it is given."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.loadgen import RequestRecord
from benchmarks.peers import artifacts, lepton_peer, llamacpp, ortgenai
from benchmarks.peers.workloads import Workload, with_fresh_prompts
from benchmarks.stats import summarize
from lepton.autoselect import kernel_choice
from lepton.server import PROJECT_ROOT

WORK_DIR = PROJECT_ROOT / "build" / "peers" / "runs"
AUTOSELECT_DIR = PROJECT_ROOT / "build" / "autoselect"  # NOTE: lepton.autoselect's timings, shared with make serve
PRECISION = {"f32": "fp32", "bf16": "16-bit", "q8_0": "8-bit", "q4_0": "4-bit", "fp32": "fp32", "int8": "8-bit",
             "int4": "4-bit", "q4_1": "4-bit"}


@dataclass(frozen=True)
class System:
    """One row of the table: which program, which weights."""

    peer: str  # llamacpp | ortgenai | lepton
    variant: str  # llamacpp: f32|bf16|q8_0|q4_0; ortgenai: fp32|int4; lepton: torch-fp32|torch-bf16|ort-fp32|ort-bf16|...

    @property
    def precision(self) -> str:
        return PRECISION[self.variant.rsplit("-", 1)[-1]]

    @property
    def label(self) -> str:
        if self.peer == "llamacpp":
            return f"llama.cpp server {self.variant.upper()}"
        if self.peer == "ortgenai":
            return f"onnxruntime-genai {self.variant}"
        runner, weights = self.variant.split("-")
        return f"Lepton {'torch' if runner == 'torch' else 'ONNX Runtime'} {weights}"


@dataclass
class Context:
    """What every system run needs: the model, the workloads and their token ids, settings, a logger."""

    model_dir: Path
    workloads: dict[str, Workload]
    ids: dict[str, list[int]]
    num_threads: int
    lepton_params: dict[str, str]
    factory: object
    log: object
    prefix_off_done: bool = False
    kernels: dict[str, str] = field(default_factory=dict)  # ONNX Runtime variant -> the matmul_kernel it runs with


def _summary(records: list[RequestRecord], wall_cpu: dict | None = None) -> dict:
    return summarize(records, wall_cpu) | {"loadavg_after": os.getloadavg()}


def run_llamacpp(system: System, ctx: Context) -> dict:
    """One server with 16 slots for W1, W2 and the prefix run, one with 64 for the others."""
    model = artifacts.gguf(ctx.model_dir, system.variant, ctx.log)
    out = {"artifact": str(model), "weight_bytes": artifacts.weight_bytes_on_disk(model), "workloads": {}}
    groups = {16: [w for w in ctx.workloads.values() if w.name in ("w1", "w2", "prefix", "prefix_warm")],
              64: [w for w in ctx.workloads.values() if w.name in ("c64", "poisson")]}
    for parallel, workloads in groups.items():
        if not workloads:
            continue
        slot_context = -(-max(w.max_context for w in workloads) // 256) * 256 + 256
        port = lepton_peer._free_port()
        log_file = WORK_DIR / "llamacpp" / f"{system.variant}-{parallel}.log"
        with llamacpp.LlamaServer(model, port, parallel, slot_context, ctx.num_threads, log_file) as server:
            out.setdefault("commands", []).append(" ".join(
                os.path.relpath(w, PROJECT_ROOT) if w.startswith(str(PROJECT_ROOT)) else w for w in server.command))
            llamacpp.warm_up(server.url, next(iter(ctx.ids.values()))[:16])
            for w in workloads:
                out["workloads"][w.name] = _summary(asyncio.run(llamacpp.run_workload(server.url, w, ctx.ids)))
                ctx.log(f"[{system.label}] {w.name}: {_line(out['workloads'][w.name])}")
    return out


def run_ortgenai(system: System, ctx: Context) -> dict:
    """All workloads in one worker process (in process, static batches); not the runs after a warm-up (it caches
    no prefix: a warm-up changes nothing)."""
    model = artifacts.ortgenai(ctx.model_dir, system.variant, ctx.num_threads, ctx.log)
    records, version = ortgenai.run_workloads(model, [w for w in ctx.workloads.values() if not w.warmup], ctx.ids,
                                              WORK_DIR / "ortgenai" / system.variant, ctx.log)
    out = {"artifact": str(model), "weight_bytes": artifacts.weight_bytes_on_disk(model), "version": version,
           "workloads": {}}
    for name, recs in records.items():
        out["workloads"][name] = _summary(recs)
        ctx.log(f"[{system.label}] {name}: {_line(out['workloads'][name])}")
    return out


def lepton_parameters(system: System, ctx: Context, prefix_caching: bool = True) -> dict[str, str]:
    runner = "torch" if system.variant.startswith("torch") else "onnxruntime"
    dtype = {"dtype": "bfloat16"} if system.variant == "torch-bf16" else \
        {"weight_dtype": "bfloat16"} if system.variant == "ort-bf16" else {}
    # NOTE: the thread counts make serve picks from: torch leaves a core to Triton's front end (the
    # engine's default), ONNX Runtime computes with as many threads as the peers (docs/performance.md,
    # "Threads when served"); --lepton-param num_threads=N overrides both.
    threads = {} if runner == "torch" else {"num_threads": str(ctx.num_threads)}
    # NOTE: the weight products' kernel as make serve takes it: timed, not picked by the flags (run_lepton)
    kernel = ctx.kernels.get(system.variant, "auto")
    products = {} if kernel == "auto" else {"matmul_kernel": kernel}
    return dtype | threads | products | {"runner": runner, "max_num_seqs": "64", "max_num_batched_tokens": "512", "kv_cache_memory_bytes": "1G",
            "enable_prefix_caching": str(prefix_caching).lower()} | ctx.lepton_params


def run_lepton(system: System, ctx: Context) -> dict:
    """Every workload through tritonserver; W2 also in process, back to back with the served runs; the first
    variant also without prefix caching."""
    runner, precision = system.variant.split("-")
    note, gate_failed = "", False
    if runner == "torch":
        model = ctx.model_dir
    elif precision == "bf16":  # NOTE: the float32 export, its products in bfloat16 (weight_dtype=bfloat16)
        model, note = artifacts.lepton_onnx(ctx.model_dir, "fp32", ctx.log)
        passed, quality = artifacts.bf16_weights_quality(model, ctx.log)
        note, gate_failed = f"{note}; {quality}", not passed
    else:
        model, note = artifacts.lepton_onnx(ctx.model_dir, precision, ctx.log)
    kernel_note = ""
    if runner == "ort" and precision != "bf16":  # NOTE: the products' kernel make serve would take, timed here
        ctx.kernels[system.variant], kernel_note = kernel_choice(model, ctx.num_threads, AUTOSELECT_DIR)
        ctx.log(f"[{system.label}] matmul_kernel={ctx.kernels[system.variant]}: {kernel_note}")
    out = {"artifact": str(model), "kernel_choice": kernel_note, "weight_bytes": artifacts.weight_bytes_on_disk(model),
           "workloads": {}, "engine_parameters": lepton_parameters(system, ctx), "quality_gate": note,
           "gate_failed": gate_failed}
    work = WORK_DIR / "lepton" / system.variant
    server = lepton_peer.start_server(model, lepton_parameters(system, ctx), work, ctx.factory, ctx.log)
    try:
        for w in ctx.workloads.values():
            out["workloads"][w.name] = lepton_peer.run_served(server, w)
            ctx.log(f"[{system.label}] {w.name}: {_line(out['workloads'][w.name])}")
        if "w2" in ctx.workloads:
            out["w2_pairs"], out["w2_perf_analyzer"], out["decode_reads"] = _served_and_in_process(
                system, ctx, server, model, out["workloads"]["w2"], work)
            out["w2_in_process"] = out["w2_pairs"][0]["in_process"]
    finally:
        server.stop()
    prefix_runs = [name for name in ("prefix", "prefix_warm") if name in ctx.workloads]
    if prefix_runs and not ctx.prefix_off_done:
        ctx.prefix_off_done = True
        params = lepton_parameters(system, ctx, prefix_caching=False)
        server = lepton_peer.start_server(model, params, work.with_name(work.name + "-nocache"), ctx.factory, ctx.log)
        try:
            for name in prefix_runs:
                out[f"{name}_no_caching"] = lepton_peer.run_served(server, ctx.workloads[name])
                ctx.log(f"[{system.label}] {name}, caching off: {_line(out[f'{name}_no_caching'])}")
        finally:
            server.stop()
    return out


def _served_and_in_process(system: System, ctx: Context, server, model: Path, served: dict,
                           work: Path) -> tuple[list[dict], dict, dict | None]:
    """W2 through Triton and the same engine in process, back to back (the server idle meanwhile), twice in
    alternating order: the served W2 just run, then in process; then, with fresh prompts (no prefix cache holds
    them), in process, then served. This machine's speed moves by 20-30 % between minutes, so a ratio of runs
    taken minutes apart measures the machine, not serving (docs/performance.md). Then a third pair with fresh
    prompts: W2 sent by perf_analyzer (C++) instead of benchmarks.loadgen (Python), then in process: how much of
    the served run's loss is the client's CPU on this machine's cores. Also returns the bytes of weights the
    engine's decode step reads (its runner's DecodeReads; None where the runner does not count them)."""
    engine = lepton_peer.in_process_engine(model, lepton_parameters(system, ctx))
    reads = getattr(engine.runner, "decode_reads", None)
    again = with_fresh_prompts(ctx.factory, ctx.workloads["w2"], "w2-again")

    def in_process(workload) -> dict:
        started = time.process_time()
        records = lepton_peer.run_in_process(engine, workload)
        summary = _summary(records, {"client_s": time.process_time() - started, "server_s": 0.0})
        ctx.log(f"[{system.label}] w2 in process: {_line(summary)}")
        return summary

    first = {"served": served, "in_process": in_process(ctx.workloads["w2"])}
    second = {"in_process": in_process(again)}
    second["served"] = lepton_peer.run_served(server, again)
    ctx.log(f"[{system.label}] w2 served again: {_line(second['served'])}")
    third_workload = with_fresh_prompts(ctx.factory, ctx.workloads["w2"], "w2-perf-analyzer")
    try:
        third = {"served": lepton_peer.run_served_perf_analyzer(server, third_workload, work / "perf_analyzer")}
        ctx.log(f"[{system.label}] w2 served, perf_analyzer's client: {_line(third['served'])}")
    except Exception as exc:  # NOTE: the comparison stands without it
        ctx.log(f"[{system.label}] w2 through perf_analyzer failed: {exc}")
        third = {"served": {"error": f"{type(exc).__name__}: {exc}"[:2000]}}
    third["in_process"] = in_process(third_workload)
    return [first, second], third, None if reads is None else asdict(reads)


RUNNERS = {"llamacpp": run_llamacpp, "ortgenai": run_ortgenai, "lepton": run_lepton}


def run_system(system: System, ctx: Context) -> dict:
    """The system's results; a failure is recorded, not raised, so the other systems still run."""
    started = time.monotonic()
    try:
        out = RUNNERS[system.peer](system, ctx)
    except Exception as exc:  # NOTE: one broken peer must not cost the whole sitting
        ctx.log(f"[{system.label}] failed: {type(exc).__name__}: {exc}")
        out = {"error": f"{type(exc).__name__}: {exc}"[:2000], "workloads": {}}
    return {"peer": system.peer, "variant": system.variant, "label": system.label, "precision": system.precision,
            "seconds": round(time.monotonic() - started, 1)} | out


def _line(s: dict) -> str:
    if "ttft_ms" not in s:
        return f"{s.get('num_errors')} of {s.get('num_requests')} failed: {s.get('errors')}"
    return (f"{s['output_tok_per_s']:.1f} out tok/s, TTFT p50 {s['ttft_ms']['p50']:.0f} ms, ITL p50 "
            f"{s['itl_ms']['p50'] or 0:.1f} ms, wall {s['wall_s']:.1f} s, errors {s['num_errors']}")
