"""Engine configuration: one typed, validated object built once from flags or config.pbtxt."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from lepton.errors import ConfigError, InvalidRequest

if TYPE_CHECKING:
    from lepton.sampling_params import SamplingParams

RUNNERS = ("torch", "onnxruntime", "tensorrt")
DTYPES = ("float32", "bfloat16")
# NOTE: onnxruntime only. "slots": each running sequence's K/V also in a contiguous cache, attended by one
# fused operator per layer (ATTENTION_KERNELS; lepton/runners/slot_runner.py); "paged": the exported graph
# as it is, gathering K/V from the block pools each layer; "auto": slots where the graph allows it, paged
# with deterministic=true (lepton/runners/__init__.py).
ATTENTIONS = ("auto", "slots", "paged")
# NOTE: attention=slots: "lepton": lepton/native's SlotAttention operator (lepton/native/slot_attention.c);
# "onnxruntime": ONNX Runtime's GroupQueryAttention; "auto": lepton's when its library is built.
ATTENTION_KERNELS = ("auto", "lepton", "onnxruntime")
# NOTE: onnxruntime, 8-bit exports (q8_0): "lepton": lepton/native's MatMulQ8 (lepton/native/q8_matmul.c)
# for ONNX Runtime's MatMulNBits; "onnxruntime": MatMulNBits; "auto": lepton's when its library is built
# and the processor has AVX-512 VNNI or AVX2 + FMA (lepton/runners/q8_graph.py). 4-bit exports (q4_1): "lepton": MatMulQ4
# (lepton/native/q4_matmul.c, lepton/runners/q4_graph.py; level-0 products with int16 activations where AVX2 has no
# AVX-512 BF16); "auto": with AVX-512 VNNI, AVX-512 BF16 or AVX2 + FMA. float32 exports:
# "lepton": MatMulF32 (lepton/native/f32_matmul.c, lepton/runners/f32_graph.py) for MatMul and Gemm; "auto": with
# AVX-512F or AVX2 + FMA.
MATMUL_KERNELS = ("auto", "lepton", "onnxruntime")
# NOTE: onnxruntime, float32 exports: "bfloat16": the weight products in bfloat16 through lepton/native's
# MatMulBF16 (AVX-512 BF16, or AVX2 + FMA widening the weights; lepton/runners/bf16_graph.py), everything else float32; "export": the export's own
# weights (a float32 export's products then by MatMulF32 or MLAS, as matmul_kernel picks).
WEIGHT_DTYPES = ("export", "bfloat16")
# NOTE: attention=slots with Lepton's SlotAttention: the dtype of the per-sequence K/V copies ("slots") that
# attention reads each step. "float16": this step's keys and values rounded to float16 as they are
# written, half the bytes a decode reads; the block pools stay float32 and hold the same rounded values.
# "int8": each row of a kv head (D values) kept as D int8 codes and a float32 scale (max|x| / 127), 68 bytes
# a row of 64 against float16's 128 (lepton/native/slot_attention.c SlotAttentionI8); the pools hold the
# rows' values (code x scale).
# "auto": float16 where the weights are already approximate (a quantized export, weight_dtype=bfloat16),
# whose quality gates are measured through the runner as it serves; float32 otherwise
# (lepton/runners/slot_runner.py kv_cache_dtype).
KV_CACHE_DTYPES = ("auto", "float32", "float16", "int8")
SCHEDULING_POLICIES = ("fcfs", "priority")
STREAM_INTERVAL_CEILING = 1024  # tokens a streamed response may wait for


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: block geometry and how much memory the pools may take."""

    block_size: int = 16  # tokens per KV block
    kv_cache_memory_bytes: int = 512 << 20  # K and V pools of all layers together
    kv_cache_memory_fraction: float = 0.0  # if > 0: this share of the memory the weights leave available
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_batched_tokens: int = 512  # tokens computed in one step, prefill chunks and decodes
    max_num_seqs: int = 64  # sequences running at once
    max_queue_size: int = 256  # waiting requests before new ones are refused as busy
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # "fcfs", or "priority" (lower SamplingParams.priority first)


@dataclass(frozen=True)
class RunnerConfig:
    """How the model is executed."""

    # "torch": a HF folder; "onnxruntime": an export folder (python -m export onnx);
    # "tensorrt": an engine folder (python -m export tensorrt), GPU hosts only
    runner: str = "torch"
    dtype: str = "float32"  # compute and KV cache dtype
    num_threads: int = 0  # intra-op threads; 0 = all cores but one (see compute_threads)
    # NOTE: true: a request's logits do not depend on what else is batched (lepton/models/batch_invariant.py)
    deterministic: bool = False
    device_id: int = 0  # the CUDA device of the tensorrt runner (a KIND_GPU instance sets its GPU)
    attention: str = "auto"  # onnxruntime: "auto", "slots" or "paged" (see ATTENTIONS)
    attention_kernel: str = "auto"  # attention=slots: "auto", "lepton" or "onnxruntime" (see ATTENTION_KERNELS)
    matmul_kernel: str = "auto"  # q8_0 / q4_1 / float32 weight products: "auto", "lepton" or "onnxruntime" (see MATMUL_KERNELS)
    weight_dtype: str = "export"  # onnxruntime: "export" or "bfloat16" products (see WEIGHT_DTYPES)
    kv_cache_dtype: str = "auto"  # attention=slots: "auto", "float32" or "float16" slots (see KV_CACHE_DTYPES)
    # NOTE: onnxruntime: true: intra-op threads spin between ops while a step runs and sleep once it returns
    # (session.force_spinning_stop); false: they sleep between ops too
    spin_wait: bool = True
    # NOTE: onnxruntime, with spin_wait: how long a thread spins for the next op before it sleeps
    # (session.intra_op.spin_duration_us); 0 = ONNX Runtime's own default, which served on 2 cores lost to
    # sleeping; 100 us served 1.09x / 1.19x the 16-stream throughput of sleeping (docs/performance.md)
    spin_duration_us: int = 100
    # NOTE: onnxruntime with attention=slots, a q8_0 / q4_1 export's rescored 8-bit lm_head or a tied float32 /
    # bfloat16 one: steps whose sampler reads only each row's argmax (greedy, no logprobs or penalties) pick its
    # candidates with a 4-bit draft of it and rescore them (lepton/runners/draft_head.py)
    draft_head: bool = True

    @property
    def compute_threads(self) -> int:
        """Threads the runner computes with."""
        # NOTE: on 2 cores, torch with 2 OpenMP threads slowed 5-20x whenever another process took
        # a core (docs/benchmarks-serving.md); one core is left to Triton's front end and the detokenizer.
        return self.num_threads or max(1, len(os.sched_getaffinity(0)) - 1)


# NOTE: the most a configured limit may allow: past these the parser or the sampler itself is the risk.
STOP_STRINGS_CEILING = 1024
STOP_STRING_CHARS_CEILING = 4096
LOGPROBS_CEILING = 100


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request limits that protect the server; a request past one is refused naming the field and the limit."""

    max_request_bytes: int = 1 << 20  # bytes of a request's inputs together (prompt, messages, stop, ...)
    max_prompt_tokens: int = 0  # prompt tokens; 0 = the model's context less one
    max_output_tokens: int = 0  # max_tokens; 0 = whatever the context leaves after the prompt
    max_stop_strings: int = 16  # stop strings a request
    max_stop_string_chars: int = 256  # characters of each stop string
    max_logprobs: int = 20  # top logprobs a generated token

    def check(self, params: "SamplingParams") -> None:
        """Raise InvalidRequest for the first field of params past its limit."""
        if self.max_output_tokens and params.max_tokens > self.max_output_tokens:
            raise InvalidRequest("max_tokens", f"must be <= {self.max_output_tokens} (max_output_tokens), "
                                               f"got {params.max_tokens}")
        if len(params.stop) > self.max_stop_strings:
            raise InvalidRequest("stop", f"at most {self.max_stop_strings} stop strings, got {len(params.stop)}")
        longest = max((len(s) for s in params.stop), default=0)
        if longest > self.max_stop_string_chars:
            raise InvalidRequest("stop", f"each stop string must be 1..{self.max_stop_string_chars} characters of "
                                         f"text, got one of {longest}")
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise InvalidRequest("logprobs", f"must be <= {self.max_logprobs}, got {params.logprobs}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs; each component reads its own sub-config."""

    model_dir: Path
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    default_max_tokens: int = 128  # when a request names no max_tokens
    # NOTE: streaming: a response every this many tokens (the first at once, the rest with the final one);
    # 1 = every token. Each response costs the stub, tritonserver and the client CPU time that the model's
    # steps share on a small host (docs/performance.md, "What serving costs").
    stream_interval: int = 1

    def __post_init__(self) -> None:
        _positive(self.cache, "block_size", "kv_cache_memory_bytes")
        _positive(self.scheduler, "max_num_batched_tokens", "max_num_seqs", "max_queue_size")
        _choice("runner", self.runner.runner, RUNNERS)
        _choice("dtype", self.runner.dtype, DTYPES)
        _choice("attention", self.runner.attention, ATTENTIONS)
        _choice("attention_kernel", self.runner.attention_kernel, ATTENTION_KERNELS)
        _choice("matmul_kernel", self.runner.matmul_kernel, MATMUL_KERNELS)
        _choice("weight_dtype", self.runner.weight_dtype, WEIGHT_DTYPES)
        if self.runner.weight_dtype != "export" and self.runner.runner != "onnxruntime":
            raise ConfigError(f"weight_dtype: {self.runner.weight_dtype} applies to runner=onnxruntime only (the "
                              f"{self.runner.runner} runner computes in its dtype; torch: dtype=bfloat16)")
        _choice("kv_cache_dtype", self.runner.kv_cache_dtype, KV_CACHE_DTYPES)
        if self.runner.kv_cache_dtype in ("float16", "int8"):
            why = ("runner=onnxruntime only" if self.runner.runner != "onnxruntime" else
                   "not with attention=paged (the paged graph reads the float32 pools)" if self.runner.attention == "paged"
                   else "not with deterministic=true (it serves attention=paged)" if self.runner.deterministic else
                   "Lepton's SlotAttention only, not attention_kernel=onnxruntime"
                   if self.runner.attention_kernel == "onnxruntime" else "")
            if why:
                raise ConfigError(f"kv_cache_dtype: {self.runner.kv_cache_dtype} slots need attention=slots with "
                                  f"Lepton's SlotAttention: {why}")
        _choice("policy", self.scheduler.policy, SCHEDULING_POLICIES)
        if not 0.0 <= self.cache.kv_cache_memory_fraction < 1.0:
            raise ConfigError(f"kv_cache_memory_fraction: must be in [0, 1), got {self.cache.kv_cache_memory_fraction}")
        if self.runner.num_threads < 0:
            raise ConfigError(f"num_threads: must be >= 0, got {self.runner.num_threads}")
        if self.runner.spin_duration_us < 0:
            raise ConfigError(f"spin_duration_us: must be >= 0, got {self.runner.spin_duration_us}")
        if self.runner.device_id < 0:
            raise ConfigError(f"device_id: must be >= 0, got {self.runner.device_id}")
        if self.runner.deterministic and self.runner.runner == "tensorrt":
            raise ConfigError("deterministic: not available with runner tensorrt (its kernels are chosen by the "
                              "builder per batch shape); use runner torch or onnxruntime")
        if self.max_model_len < 0 or self.default_max_tokens < 1:
            raise ConfigError("max_model_len must be >= 0 and default_max_tokens >= 1")
        if not 1 <= self.stream_interval <= STREAM_INTERVAL_CEILING:
            raise ConfigError(f"stream_interval: must be in [1, {STREAM_INTERVAL_CEILING}], got {self.stream_interval}")
        limits = self.limits
        _positive(limits, "max_request_bytes", "max_stop_strings", "max_stop_string_chars")
        for name, value, ceiling in (("max_stop_strings", limits.max_stop_strings, STOP_STRINGS_CEILING),
                                     ("max_stop_string_chars", limits.max_stop_string_chars, STOP_STRING_CHARS_CEILING),
                                     ("max_logprobs", limits.max_logprobs, LOGPROBS_CEILING)):
            if not 0 <= value <= ceiling:
                raise ConfigError(f"{name}: must be in [0, {ceiling}], got {value}")
        if limits.max_prompt_tokens < 0 or limits.max_output_tokens < 0:
            raise ConfigError("max_prompt_tokens and max_output_tokens must be >= 0 (0: the context decides)")
        if limits.max_output_tokens and self.default_max_tokens > limits.max_output_tokens:
            raise ConfigError(f"default_max_tokens: must be <= max_output_tokens ({limits.max_output_tokens}), "
                              f"got {self.default_max_tokens}")

    @classmethod
    def from_parameters(cls, params: Mapping[str, Any], base_dir: Path | None = None) -> "EngineConfig":
        """Build from flat string parameters (config.pbtxt or CLI); unknown keys are an error."""
        params = dict(params)
        if "model_dir" not in params:
            raise ConfigError("model_dir: required parameter is missing")
        model_dir = Path(str(params.pop("model_dir"))).expanduser()
        if not model_dir.is_absolute() and base_dir is not None:
            model_dir = base_dir / model_dir
        sections = {"cache": CacheConfig, "scheduler": SchedulerConfig, "runner": RunnerConfig, "limits": LimitsConfig}
        values: dict[str, dict[str, Any]] = {name: {} for name in sections}
        top: dict[str, Any] = {}
        top_fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in sections}
        for key, raw in params.items():
            owner = next((n for n, c in sections.items() if key in _field_types(c)), None)
            if owner is not None:
                values[owner][key] = _convert(key, raw, _field_types(sections[owner])[key])
            elif key in top_fields and key != "model_dir":
                top[key] = _convert(key, raw, _field_types(cls)[key])
            else:
                known = sorted({k for c in sections.values() for k in _field_types(c)} | set(top_fields))
                raise ConfigError(f"unknown parameter {key!r}; known parameters: {', '.join(known)}")
        return cls(
            model_dir=model_dir.resolve(),
            **{name: sections[name](**values[name]) for name in sections},
            **top,
        )


def _field_types(cls) -> dict[str, type]:
    hints = {"int": int, "bool": bool, "str": str, "float": float}
    return {f.name: hints.get(str(f.type), str) for f in dataclasses.fields(cls)}


def _convert(key: str, raw: Any, kind: type) -> Any:
    text = str(raw).strip()
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(_bytes_suffix(text))
        return kind(text)
    except ValueError:
        raise ConfigError(f"{key}: expected {kind.__name__}, got {text!r}") from None


_SIZE = re.compile(r"^(\d+)\s*([kmg])?(?:i?b)?$", re.IGNORECASE)


def _bytes_suffix(text: str) -> int:
    """Parse an integer with an optional K/M/G (binary) suffix: '512M' -> 536870912."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(text)
    scale = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[(match.group(2) or "").lower() or None]
    return int(match.group(1)) * scale


def _positive(section: Any, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(section, name)}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")
