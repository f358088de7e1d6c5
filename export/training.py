"""Train a model folder on standard-library docstrings: seeded AdamW, causal LM loss, held-out perplexity."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sysconfig
import time
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from export.corpus import MODULES, stdlib_docstrings
from lepton.model_folder import ModelFolder

LOG_FILE = "training_log.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# NOTE: tests, GUI code, vendored tools, generated codecs and build data are not prose worth learning.
SKIPPED_PACKAGES = ("idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages", "__phello__",
                    "encodings")
SKIPPED_PREFIXES = ("test", "config-", "_sysconfigdata")
HELD_OUT_PERCENT = 10
# NOTE: what torch cannot promise: bitwise equal runs need the same thread count, CPU kernel family
# (AVX2 vs AVX-512 pick different blockings) and torch/MKL build; a --minutes budget fixes the
# step count from measured speed, so only --steps runs repeat exactly.
NONDETERMINISM = ("same --threads, CPU instruction set and torch build needed for equal runs; "
                  "--minutes without --steps derives the step count from measured speed")


@dataclass(frozen=True)
class TrainOptions:
    """What `python -m export train` was asked to do."""

    model_dir: Path
    out_dir: Path
    steps: int | None = None  # optimizer steps; None = as many as fit in `minutes`
    minutes: float | None = None  # wall-clock budget; with steps given, a hard stop
    seq_len: int = 256
    batch_size: int = 8
    learning_rate: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    seed: int = 0
    num_threads: int = 2  # torch intra-op threads; runs repeat exactly only at the same count
    log_every: int = 10
    eval_windows: int = 64  # held-out windows of seq_len tokens for perplexity
    modules: tuple[str, ...] | None = None  # corpus modules; None = stdlib_modules()


@dataclass(frozen=True)
class CorpusSplit:
    """Standard-library modules whose docstrings train the model, and those held out for evaluation."""

    train: tuple[str, ...]
    held_out: tuple[str, ...]


@dataclass(frozen=True)
class TrainLog:
    """training_log.json: settings, loss curve and held-out perplexity of one run."""

    seed: int
    num_threads: int
    steps: int  # optimizer steps taken
    stopped_by: str  # "steps", or "minutes" (the budget ended the run early)
    seq_len: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    tokens_seen: int
    seconds: float
    tokens_per_second: float
    losses: tuple[float, ...]  # training loss of every step
    held_out_perplexity_before: float
    held_out_perplexity_after: float
    train_modules: int
    held_out_modules: tuple[str, ...]
    train_tokens: int
    held_out_tokens: int
    corpus_sha256: str  # of both token streams, train then held out
    torch: str
    reproduce: str  # the command line that repeats this run exactly
    nondeterminism: str = NONDETERMINISM


def stdlib_modules() -> tuple[str, ...]:
    """This interpreter's standard-library modules (as corpus names), sorted, without SKIPPED_PACKAGES."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = []
    for source in sorted(root.rglob("*.py")):
        parts = source.relative_to(root).with_suffix("").parts
        if parts[0] in SKIPPED_PACKAGES or any(part.startswith(SKIPPED_PREFIXES) for part in parts):
            continue
        names.append("/".join(parts))
    return tuple(names)


def split_modules(modules: tuple[str, ...]) -> CorpusSplit:
    """Hold out about HELD_OUT_PERCENT of modules by a hash of the name; the tokenizer's modules always train."""
    def held(name: str) -> bool:
        bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 100
        return name not in MODULES and bucket < HELD_OUT_PERCENT

    return CorpusSplit(tuple(m for m in modules if not held(m)), tuple(m for m in modules if held(m)))


def token_stream(tokenizer_file: Path, modules: tuple[str, ...]) -> np.ndarray:
    """The modules' docstrings tokenized (BOS from the tokenizer), each ended by EOS, as one int64 stream."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos = eos_token_id(tokenizer_file.parent, tokenizer)
    encoded = tokenizer.encode_batch(stdlib_docstrings(modules))
    return np.fromiter(chain.from_iterable(e.ids + [eos] for e in encoded), dtype=np.int64)


def eos_token_id(folder: Path, tokenizer) -> int:
    """EOS id of a model or export folder: tokenizer_config's eos_token, else generation_config's or config's."""
    # NOTE: the demo's is "</s>", SmolLM2's "<|im_end|>"; a list of eos_token_id gives its first.
    configs = {name: _read_json(folder / name) for name in ("tokenizer_config.json", "generation_config.json",
                                                             "config.json")}
    token = configs["tokenizer_config.json"].get("eos_token")
    token = token.get("content") if isinstance(token, dict) else token  # NOTE: or an AddedToken dict
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    for name in ("generation_config.json", "config.json"):
        ids = configs[name].get("eos_token_id")
        ids = ids if isinstance(ids, list) else [ids]
        if ids and isinstance(ids[0], int) and 0 <= ids[0] < tokenizer.get_vocab_size():
            return ids[0]
    raise ValueError(f"{folder}: no EOS token in tokenizer_config.json (eos_token), generation_config.json "
                     "or config.json (eos_token_id) that the tokenizer knows")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def spaced_windows(stream: np.ndarray, num_windows: int, length: int) -> np.ndarray:
    """num_windows non-overlapping windows of length tokens, spread evenly over the stream."""
    available = len(stream) // length
    if num_windows < 1 or available < num_windows:
        raise ValueError(f"the held-out text holds {available} windows of {length} tokens; {num_windows} asked")
    starts = np.arange(num_windows) * (available // num_windows) * length
    return np.stack([stream[s:s + length] for s in starts])


def held_out_windows(tokenizer_file: Path, num_windows: int, length: int) -> np.ndarray:
    """Evaluation windows [num_windows, length] from the held-out modules of stdlib_modules()."""
    return spaced_windows(token_stream(tokenizer_file, split_modules(stdlib_modules()).held_out), num_windows, length)


def calibration_windows(tokenizer_file: Path, num_windows: int, length: int) -> np.ndarray:
    """Windows [num_windows, length] from the training modules (never the held-out ones quality is measured on)."""
    return spaced_windows(token_stream(tokenizer_file, split_modules(stdlib_modules()).train), num_windows, length)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def perplexity(model, windows, batch_size: int = 8) -> float:
    """exp of the mean next-token loss over windows [N, L] (torch int64)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            tokens = batch.numel() - batch.shape[0]
            total += float(model(input_ids=batch, labels=batch).loss) * tokens
            count += tokens
    model.train()
    return math.exp(total / count)


def train(options: TrainOptions) -> TrainLog:
    """Train, evaluate before and after, and write a servable HF folder with training_log.json."""
    import torch

    if options.steps is None and options.minutes is None:
        raise ValueError("give --steps, --minutes or both")
    if options.warmup_steps < 1 or options.seq_len < 2 or options.batch_size < 1:
        raise ValueError("warmup_steps and batch_size must be >= 1, seq_len >= 2")
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(options.num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(options, ModelFolder.open(options.model_dir))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(options: TrainOptions, folder: ModelFolder) -> TrainLog:
    import torch
    from transformers import AutoModelForCausalLM

    split = split_modules(options.modules or stdlib_modules())
    print(f"[train] corpus: {len(split.train)} modules train, {len(split.held_out)} held out; tokenizing")
    train_ids = token_stream(folder.tokenizer_file, split.train)
    held_ids = token_stream(folder.tokenizer_file, split.held_out)
    torch.manual_seed(options.seed)
    model = AutoModelForCausalLM.from_pretrained(folder.path, dtype=torch.float32)
    held_out = torch.from_numpy(spaced_windows(held_ids, options.eval_windows, options.seq_len))
    before = perplexity(model, held_out)
    print(f"[train] {len(train_ids):,} train tokens; held-out perplexity before {before:.2f} "
          f"({options.eval_windows} windows of {options.seq_len})")
    started = time.monotonic()
    losses, stopped_by = _optimize(model, torch.from_numpy(train_ids), options)
    seconds = time.monotonic() - started
    after = perplexity(model, held_out)
    print(f"[train] {len(losses)} steps in {seconds:.0f} s; held-out perplexity {before:.2f} -> {after:.2f}")
    digest = hashlib.sha256(train_ids.tobytes() + held_ids.tobytes()).hexdigest()
    tokens = len(losses) * options.batch_size * options.seq_len
    log = TrainLog(
        seed=options.seed, num_threads=options.num_threads, steps=len(losses), stopped_by=stopped_by,
        seq_len=options.seq_len, batch_size=options.batch_size, learning_rate=options.learning_rate,
        weight_decay=options.weight_decay, warmup_steps=options.warmup_steps, tokens_seen=tokens,
        seconds=round(seconds, 1), tokens_per_second=round(tokens / seconds, 1), losses=tuple(losses),
        held_out_perplexity_before=before, held_out_perplexity_after=after, train_modules=len(split.train),
        held_out_modules=split.held_out, train_tokens=len(train_ids), held_out_tokens=len(held_ids),
        corpus_sha256=digest, torch=torch.__version__, reproduce=_command(options, len(losses)),
    )
    _save(model, folder, options.out_dir, log)
    return log


def _optimize(model, stream, options: TrainOptions) -> tuple[list[float], str]:
    """AdamW steps on random windows of the stream; returns per-step losses and what stopped the run."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=options.learning_rate)
    generator = torch.Generator().manual_seed(options.seed)
    offsets = torch.arange(options.seq_len)
    total = options.steps or 1 << 30
    budget = options.minutes * 60 if options.minutes is not None else math.inf
    losses: list[float] = []
    started = last = time.monotonic()
    while len(losses) < total:
        step = len(losses)
        if options.steps is None and step == options.warmup_steps:
            total = max(step + 1, int(budget / ((time.monotonic() - started) / step)))
            print(f"[train] {total} steps fit in {options.minutes} min; rerun with --steps {total} to repeat")
        for group in optimizer.param_groups:
            group["lr"] = options.learning_rate * lr_factor(step, options.warmup_steps, total)
        starts = torch.randint(0, len(stream) - options.seq_len, (options.batch_size,), generator=generator)
        batch = stream[starts[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % options.log_every == 0 or step + 1 == total:
            last = _progress(losses, options, total, started, last)
        if time.monotonic() - started > budget:
            return losses, "minutes"
    return losses, "steps" if options.steps is not None else "minutes"


def _progress(losses: list[float], options: TrainOptions, total: int, started: float, last: float) -> float:
    now = time.monotonic()
    window = losses[-options.log_every:]
    rate = len(window) * options.batch_size * options.seq_len / max(now - last, 1e-9)
    left = (now - started) / len(losses) * (total - len(losses))
    print(f"[train] step {len(losses)}/{total}  loss {sum(window) / len(window):.3f}  {rate:,.0f} tok/s  "
          f"{now - started:.0f} s elapsed, ~{left:.0f} s left", flush=True)
    return now


def _command(options: TrainOptions, steps: int) -> str:
    return (f"python -m export train --model {options.model_dir} --out {options.out_dir} --steps {steps} "
            f"--seed {options.seed} --threads {options.num_threads} --batch-size {options.batch_size} "
            f"--lr {options.learning_rate}")


def _save(model, folder: ModelFolder, out_dir: Path, log: TrainLog) -> None:
    """Safetensors, config, tokenizer files and the log into out_dir, which appears complete or not at all."""
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (folder.path / name).is_file():
            shutil.copy2(folder.path / name, staging / name)
    (staging / LOG_FILE).write_text(json.dumps(asdict(log), indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
