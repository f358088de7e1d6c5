"""Pick the fastest serving configuration of a model on this processor, among those proven good.

Candidates are the torch runner on the model folder itself and the ONNX exports built from it
(`build/onnx/*` whose manifest names this folder as its source); a quantized export is a candidate
only when its quality report (written by `python -m export quantize`) passed its gate, and the torch
runner in bfloat16 only on a processor with bfloat16 products (AVX512-BF16, AMX) and while its report
(`python -m export.runner_quality`, build/quality/) for exactly these files passed its gate. Each is
timed here, on this processor, through the engine itself (a 16-sequence and a 1-sequence decode
step, a 128-token prompt), because the winner differs between processors (AVX2 / AVX-512 / VNNI / BF16 / AMX). One
disturbed timing must not decide: the candidates scoring within CONTENDER_MARGIN of the best are timed
again, in alternating order, up to ROUNDS times in all, and each keeps its fastest round (a busy
machine only ever adds time). The result is cached per processor and candidate set. An explicit runner
setting never comes here.

Which kernel computes an ONNX export's weight products is timed too, not read off the processor's flags:
where Lepton's operators can take an export's products (q8_0, q4_1, float32; lepton/runners/q8_graph.py),
the export is a candidate twice, with RunnerConfig.matmul_kernel at `auto` (what the flags pick) and at the
other kernel (`onnxruntime` where auto picks Lepton's, `lepton` where it picks ONNX Runtime's MatMulNBits,
MatMul and Gemm). The export's quality gate holds for both: they compute the same products (q8_0 and float32:
the same numbers up to the order of float32 sums; q4_1: the same int8 arithmetic at accuracy level 4, and at
level 0 float32 activations in MatMulNBits where MatMulQ4 rounds them to bfloat16).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
BATCH = 16
QUALITY_DIR = Path(__file__).resolve().parent.parent / "build" / "quality"  # runner quality reports
PROMPT_TOKENS = 64  # per sequence of the decode timings
PREFILL_TOKENS = 128  # the prompt whose prefill step is timed
PROMPT_PER_OUTPUT = 1.0  # prompt tokens prefilled per generated token (the benchmarks' 128 in, 128 out)
ROUNDS = 3  # timings of a contender at most
CONTENDER_MARGIN = 1.3  # a candidate scoring within this factor of the best is timed again
TIMING_METHOD = 3  # NOTE: part of the cache key; 3 = both kernels timed (2: contenders re-timed, prefill timed)


@dataclass(frozen=True)
class Candidate:
    """One configuration the engine may serve."""

    name: str  # e.g. "onnxruntime int8"
    runner: str
    model_dir: Path
    num_threads: int
    dtype: str = "float32"
    weight_dtype: str = "export"  # onnxruntime: "bfloat16" = a float32 export's products in bfloat16
    matmul_kernel: str = "auto"  # onnxruntime: RunnerConfig.matmul_kernel

    def engine_parameters(self) -> dict[str, str]:
        """The engine parameters (EngineConfig.from_parameters) that serve this candidate, defaults left out."""
        params = {"runner": self.runner, "num_threads": str(self.num_threads)}
        defaults = (("dtype", "float32"), ("weight_dtype", "export"), ("matmul_kernel", "auto"))
        return params | {key: getattr(self, key) for key, default in defaults if getattr(self, key) != default}


@dataclass(frozen=True)
class Timing:
    candidate: Candidate
    decode_batch_ms: float  # median step with BATCH sequences decoding
    decode_one_ms: float  # median step with one sequence decoding
    prefill_ms: float  # median step prefilling one PREFILL_TOKENS-token prompt
    rounds: int = 1  # timings these figures are the fastest of (each figure its own fastest)

    @property
    def score(self) -> float:
        """Time per generated token under load, with single-stream latency as a minor term, plus the
        prefill of PROMPT_PER_OUTPUT prompt tokens per generated token.

        NOTE: a quarter of a one-decode step spread over the batch. Before, a quarter of the whole
        one-decode step was added to a batched token's time, so single-stream latency (25 ms against
        3 ms a token at 16 streams) decided alone, and picked ONNX Runtime fp32 with 1 thread, the
        slowest of the three served at 16 streams (docs/performance.md, "Threads when served").
        Prefill counts because its speed ranks candidates differently from decoding: without VNNI an
        8-bit export decodes faster than fp32 and prefills slower (docs/performance.md).
        """
        decode = (self.decode_batch_ms + 0.25 * self.decode_one_ms) / BATCH
        return decode + PROMPT_PER_OUTPUT * self.prefill_ms / PREFILL_TOKENS


def cpu_features() -> dict[str, object]:
    """The processor's name, usable cores and the instruction-set extensions that change the winner."""
    flags: set[str] = set()
    name = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": name, "cores": len(os.sched_getaffinity(0)), **{f: f in flags for f in CPU_FLAGS}}


def has_bf16_compute(cpu: dict) -> bool:
    """bfloat16 products in hardware (AVX512-BF16 or AMX); elsewhere torch emulates them, slowly."""
    return bool(cpu.get("avx512_bf16") or cpu.get("amx_bf16"))


def report_path(model_dir: Path, runner: str, dtype: str, reports_dir: Path = QUALITY_DIR) -> Path:
    """Where `python -m export.runner_quality` writes the quality report of a runner setting."""
    return Path(reports_dir) / f"{Path(model_dir).resolve().name}-{runner}-{dtype}.json"


def fingerprint(model_dir: Path, runner: str = "torch") -> str:
    """What a runner quality report depends on: the folder's files (names, sizes, modification times)
    and the code that computes with them (torch: the step model and the torch runner; onnxruntime:
    the bfloat16 rewrite and its operator, the products' epilogues, and the attention over float16 slots it
    is served with; the float32 rewrite and its operator, which compute the float32 reference)."""
    files = sorted(p for p in Path(model_dir).resolve().iterdir() if p.is_file())
    stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    package = Path(__file__).resolve().parent
    sources = ([package / "runners" / "bf16_graph.py", package / "native" / "bf16_matmul.c", package / "native" / "bf16.h",
                package / "runners" / "epilogue_graph.py", package / "runners" / "norm_graph.py",
                package / "runners" / "slot_graph.py", package / "native" / "ort.h",
                package / "native" / "slot_attention.c", package / "native" / "half.h",
                package / "runners" / "slot_runner.py", package / "runners" / "f32_graph.py",
                package / "native" / "f32_matmul.c", package / "runners" / "graph_edit.py"]
               if runner == "onnxruntime" else [*package.glob("models/*.py"), package / "runners" / "torch_runner.py"])
    code = [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(sources)]
    return hashlib.sha256(json.dumps([stamp, code]).encode()).hexdigest()


def runner_quality_failures(model_dir: Path, runner: str, dtype: str, reports_dir: Path = QUALITY_DIR) -> str:
    """'' when the report for exactly these files passed its gate, else why the setting is left out."""
    path = report_path(model_dir, runner, dtype, reports_dir)
    if not path.is_file():
        return f"no quality report ({path}; python -m export.runner_quality --runner {runner} ...)"
    data = json.loads(path.read_text())
    if data.get("fingerprint") != fingerprint(model_dir, runner):
        return f"{path.name} was computed from other files or code; run python -m export.runner_quality again"
    failures = [f for v in data.get("variants", []) for f in v.get("failures", [])]
    return "; ".join(failures) if failures or not data.get("variants") else ""


def candidates(model_dir: Path, exports_root: Path, quality_dir: Path = QUALITY_DIR,
               cpu: dict | None = None) -> tuple[list[Candidate], list[str]]:
    """Eligible candidates, and a line for each setting left out and why."""
    model_dir = Path(model_dir).resolve()
    cpu = cpu_features() if cpu is None else cpu
    cores = len(os.sched_getaffinity(0))
    threads = sorted({cores, max(1, cores - 1)}, reverse=True)
    # NOTE: torch leaves a core to Triton's front end, timed alone or not: its OpenMP threads spin,
    # and served on 2 cores torch bf16 with 2 threads gave 0.67-0.88x the 16-stream throughput of
    # 1 thread (in process 1.14-1.37x). ONNX Runtime's threads spin at most 100 us between ops and stop when a
    # step returns (spin_wait): 2 threads served it 1.24-1.56x better while they slept between ops
    # (docs/performance.md, "Threads when served"), and spinning 100 us served it better still.
    torch_threads = [max(1, cores - 1)]
    found = [Candidate(f"torch fp32, {_threads(n)}", "torch", model_dir, n) for n in torch_threads]
    skipped = []
    if not has_bf16_compute(cpu):
        skipped.append("torch bf16: no AVX512-BF16 / AMX on this processor")
    elif failures := runner_quality_failures(model_dir, "torch", "bfloat16", quality_dir):
        skipped.append(f"torch bf16: quality gate not passed: {failures}")
    else:
        found += [Candidate(f"torch bf16, {_threads(n)}", "torch", model_dir, n, "bfloat16") for n in torch_threads]
    for manifest_file in sorted(Path(exports_root).glob("*/manifest.json")):
        export = manifest_file.parent
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if Path(manifest.get("source", {}).get("path", "")).resolve() != model_dir:
            continue
        method = (manifest.get("quantization") or {}).get("method", "fp32")
        failures = _quality_failures(export, method)
        if failures:
            skipped.append(f"{export.name} ({method}): quality gate not passed: {failures}")
            continue
        found += [Candidate(f"onnxruntime {method}, {_threads(n)}", "onnxruntime", export, n) for n in threads]
        if other := kernel_alternative(manifest, cpu):
            found += [Candidate(f"onnxruntime {method}, matmul_kernel={other}, {_threads(n)}", "onnxruntime", export, n,
                                matmul_kernel=other) for n in threads]
        if method == "fp32":
            if why := _bf16_weights_failures(export, cpu, quality_dir):
                skipped.append(f"{export.name} (fp32, bf16 weights): {why}")
            else:
                found += [Candidate(f"onnxruntime fp32, bf16 weights, {_threads(n)}", "onnxruntime", export, n,
                                    weight_dtype="bfloat16") for n in threads]
    return found, skipped


def kernel_alternative(manifest: dict, cpu: dict) -> str | None:
    """The matmul_kernel setting that computes an export's weight products with the other kernel than `auto`
    picks on this processor, or None where one kernel only can: an export whose products Lepton's operators
    do not take (int8, int4), one with external weights, or the library not built."""
    from lepton.native import ops_library
    from lepton.runners.q4_graph import INT8_LEVEL
    from lepton.runners.q8_graph import matmul_kernel

    quantization = manifest.get("quantization") or {}
    method = {"fp32": "float32", "q8_0": "q8_0", "q4_1": "q4_1"}.get(quantization.get("method", "fp32"))
    library = ops_library()
    if method is None or library is None or manifest.get("external_data"):
        return None
    auto, _ = matmul_kernel("auto", library, cpu, method=method,
                            int8_activations=quantization.get("accuracy_level") == INT8_LEVEL)
    return "onnxruntime" if auto == "lepton" else "lepton"


def _bf16_weights_failures(export: Path, cpu: dict, quality_dir: Path) -> str:
    """'' when a float32 export may be served with weight_dtype=bfloat16 here, else why not."""
    from lepton.runners.bf16_graph import unavailable

    if why := unavailable(cpu):
        return why
    if failures := runner_quality_failures(export, "onnxruntime", "bfloat16", quality_dir):
        return f"quality gate not passed: {failures}"
    return ""


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"


def _quality_failures(export: Path, method: str) -> str:
    if method == "fp32":
        return ""  # NOTE: the reference itself, validated against PyTorch at export
    report = export / "quality.json"
    if not report.is_file():
        return "no quality.json"
    variants = json.loads(report.read_text()).get("variants", [])
    problems = [f for v in variants for f in v.get("failures", [])]
    return "; ".join(problems) if problems or variants else "empty report"


def time_candidate(candidate: Candidate, steps: int = 5) -> Timing:
    """time_candidate_here in a fresh process: runners set process-wide thread counts, and memory
    is returned whole when the process ends."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(time_candidate_here, (candidate, steps))


def time_candidate_here(candidate: Candidate, steps: int = 5) -> Timing:
    """Median decode step times of the engine on this candidate (random prompts, greedy)."""
    from lepton.config import EngineConfig
    from lepton.engine import LLMEngine
    from lepton.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig.from_parameters({
        "model_dir": str(candidate.model_dir), **candidate.engine_parameters(), "kv_cache_memory_bytes": "256M",
        "max_num_seqs": str(BATCH), "max_num_batched_tokens": "2048", "enable_prefix_caching": "false",
        "max_model_len": "1024",
    }))
    vocab = engine.runner.model_config.vocab_size
    params = SamplingParams(max_tokens=4 * steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(BATCH):
        engine.add_request(f"t{i}", [(7 + 13 * i + 31 * j) % vocab for j in range(PROMPT_TOKENS)], params)
    engine.step()  # NOTE: one step prefills all (2048-token budget); the next ones decode
    batch = _median_step(engine, steps)
    for i in range(1, BATCH):
        engine.abort(f"t{i}")
    one = _median_step(engine, steps)
    engine.abort("t0")
    prefill = []
    for i in range(steps):
        engine.add_request(f"p{i}", [(11 + 17 * i + 29 * j) % vocab for j in range(PREFILL_TOKENS)],
                           SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
        started = time.perf_counter()
        engine.step()
        prefill.append((time.perf_counter() - started) * 1e3)  # NOTE: one token: finished by this step
    return Timing(candidate, batch, one, statistics.median(prefill))


def time_candidates(found: list[Candidate], rounds: int = ROUNDS, timer=time_candidate, log=None) -> list[Timing]:
    """Every candidate timed once; then, while two or more score within CONTENDER_MARGIN of the best,
    those are timed again in reverse order of the round before (rounds in all, at most). Each
    candidate's figures are the fastest of its timings: noise from other processes only adds time, and
    alternating the order spreads what a warming or cooling machine does over all of them."""
    log = log or (lambda line: print(line, flush=True))
    times: dict[Candidate, list[Timing]] = {c: [] for c in found}
    order = list(found)
    for round_index in range(rounds):
        if round_index:
            best = min(_fastest(c, times[c]).score for c in found)
            order = [c for c in reversed(order) if _fastest(c, times[c]).score <= CONTENDER_MARGIN * best]
            if len(order) < 2:
                break
        for c in order:
            again = f", round {round_index + 1} of {rounds}" if round_index else ""
            log(f"[auto] timing {c.name} ({c.model_dir.name}{again}) ...")
            times[c].append(timer(c))
    return [_fastest(c, times[c]) for c in found]


def _fastest(candidate: Candidate, timings: list[Timing]) -> Timing:
    return Timing(candidate, *(min(getattr(t, field) for t in timings)
                               for field in ("decode_batch_ms", "decode_one_ms", "prefill_ms")), len(timings))


def _median_step(engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    timings: tuple[Timing, ...]
    skipped: tuple[str, ...]
    cpu: dict
    cached: bool

    def explain(self) -> str:
        flags = [f for f in CPU_FLAGS if self.cpu.get(f)]
        lines = [f"[auto] processor: {self.cpu['model']}, {self.cpu['cores']} cores, {' '.join(flags) or 'no AVX2'}"]
        width = max(len(t.candidate.name) for t in self.timings)
        for t in sorted(self.timings, key=lambda t: t.score):
            mark = "->" if t.candidate == self.candidate else "  "
            lines.append(f"[auto] {mark} {t.candidate.name:<{width}} {BATCH} decodes {t.decode_batch_ms:7.1f} ms/step, "
                         f"1 decode {t.decode_one_ms:6.1f}, {PREFILL_TOKENS}-token prompt {t.prefill_ms:6.1f}; "
                         f"fastest of {t.rounds}  ({t.candidate.model_dir})")
        lines += [f"[auto]    left out: {line}" for line in self.skipped]
        source = "cached timing" if self.cached else "timed now"
        lines.append(f"[auto] chose {self.candidate.name}: fastest per generated token at {BATCH} streams, "
                     f"with a prompt token per generated token ({source}); an explicit --param runner=... overrides")
        return "\n".join(lines)


def choose(model_dir: Path, exports_root: Path, cache_dir: Path, quality_dir: Path = QUALITY_DIR) -> Choice:
    """Time every eligible candidate (or reuse the cached timing) and return the fastest."""
    cpu = cpu_features()
    found, skipped = candidates(model_dir, exports_root, quality_dir, cpu)
    timings, cached = timed(found, cpu, cache_dir)
    best = min(timings, key=lambda t: t.score)
    return Choice(best.candidate, tuple(timings), tuple(skipped), cpu, cached)


def kernel_choice(export: Path, num_threads: int, cache_dir: Path, timer=None) -> tuple[str, str]:
    """The matmul_kernel to serve an ONNX export with on this processor at num_threads, and why: `auto` (what the
    flags pick), or the other kernel where it timed faster (as `choose` times them); `auto` untimed where
    only one kernel can compute the export's products. For runs that fix the export and the threads
    themselves (benchmarks.peers) and still want the products `make serve` would compute them with."""
    cpu = cpu_features()
    export = Path(export).resolve()
    other = kernel_alternative(json.loads((export / "manifest.json").read_text()), cpu)
    if other is None:
        return "auto", "one kernel only for this export here"
    pair = [Candidate(f"{export.name}, {_threads(num_threads)}", "onnxruntime", export, num_threads),
            Candidate(f"{export.name}, matmul_kernel={other}, {_threads(num_threads)}", "onnxruntime", export,
                      num_threads, matmul_kernel=other)]
    timings, cached = timed(pair, cpu, cache_dir, timer)
    best = min(timings, key=lambda t: t.score)
    line = "; ".join(f"{t.candidate.matmul_kernel}: {BATCH} decodes {t.decode_batch_ms:.1f} ms, 1 decode "
                     f"{t.decode_one_ms:.1f}, {PREFILL_TOKENS}-token prompt {t.prefill_ms:.1f}" for t in timings)
    return best.candidate.matmul_kernel, f"{line} ({'cached timing' if cached else 'timed now'})"


def timed(found: list[Candidate], cpu: dict, cache_dir: Path, timer=None) -> tuple[list[Timing], bool]:
    """The candidates' timings (time_candidates), cached per processor, candidate set and code; whether cached."""
    key = hashlib.sha256(json.dumps([TIMING_METHOD, cpu, [_fingerprint(c) for c in found]],
                                    sort_keys=True).encode()).hexdigest()
    cache_file = Path(cache_dir) / f"{key[:24]}.json"
    if cache_file.is_file():
        rows = json.loads(cache_file.read_text())
        return [Timing(c, r["decode_batch_ms"], r["decode_one_ms"], r["prefill_ms"], r["rounds"])
                for c, r in zip(found, rows)], True
    timings = time_candidates(found, timer=timer or time_candidate)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps([{"candidate": c.name, "decode_batch_ms": t.decode_batch_ms,
                                       "decode_one_ms": t.decode_one_ms, "prefill_ms": t.prefill_ms, "rounds": t.rounds}
                                      for c, t in zip(found, timings)], indent=1))
    return timings, False


def _fingerprint(candidate: Candidate) -> dict:
    """What identifies a candidate's speed: its settings, its files, and the engine's compute code."""
    files = sorted(p for p in candidate.model_dir.iterdir() if p.is_file())
    stamp = [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    package = Path(__file__).resolve().parent
    code = hashlib.sha256()
    for source in sorted([*package.glob("runners/*.py"), *package.glob("models/*.py"), *package.glob("native/*.c"),
                          *package.glob("native/*.h"), package / "batch.py"]):
        code.update(source.read_bytes())
    return {**dataclasses.asdict(candidate), "model_dir": str(candidate.model_dir), "files": stamp,
            "code": code.hexdigest()}
