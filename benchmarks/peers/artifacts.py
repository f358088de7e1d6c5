"""The benchmark model converted for each system, under build/peers/models/<model>/ (built once).

Each builder returns the artifact's path; a failure raises ArtifactError with the tool's last lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lepton.native import sources
from lepton.server import PROJECT_ROOT

PEERS_DIR = PROJECT_ROOT / "build" / "peers"
PEER_PYTHON = PEERS_DIR / "venv" / "bin" / "python"
LLAMA_DIR = PEERS_DIR / "llama.cpp"
HERE = Path(__file__).parent
COMMANDS_FILE = PEERS_DIR / "models" / "commands.txt"


class ArtifactError(RuntimeError):
    """A conversion failed; the message carries the command and its output's tail."""


def _run(command: list[str], log) -> str:
    """Run a conversion; on success its command line is kept in build_commands() for the report."""
    text = " ".join(os.path.relpath(w, PROJECT_ROOT) if w.startswith(str(PROJECT_ROOT)) else w for w in command)
    log("$ " + text)
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        tail = [line for line in output.splitlines() if line.strip()][-15:] or [""]
        raise ArtifactError(f"{tail[-1].strip()} (exit {done.returncode}: {text})\n" + "\n".join(tail))
    COMMANDS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(COMMANDS_FILE, "a") as f:
        f.write(text + "\n")
    return output


def build_commands(model_dir: Path) -> list[str]:
    """Every conversion command that built an artifact of model_dir (once each, in build order)."""
    if not COMMANDS_FILE.is_file():
        return []
    tag = f"/models/{model_dir.name}/"
    return list(dict.fromkeys(c for c in COMMANDS_FILE.read_text().splitlines() if tag in c))


def artifact_dir(model_dir: Path) -> Path:
    return PEERS_DIR / "models" / model_dir.name


ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def peer_source(model_dir: Path) -> Path:
    """model_dir as the peers' converters read it: config.json must name `architectures`.

    NOTE: a folder written from a state dict (as `export smollm2` does) may lack the key; then a
    copy of the folder is made of links to its files and a config.json that has it.
    """
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures"):
        return model_dir
    out = artifact_dir(model_dir) / "hf"
    out.mkdir(parents=True, exist_ok=True)
    for file in model_dir.iterdir():
        link = out / file.name
        if file.name != "config.json" and not link.exists():
            link.symlink_to(file.resolve())
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def gguf(model_dir: Path, kind: str, log) -> Path:
    """f32 from convert_hf_to_gguf.py, bf16 / q8_0 / q4_0 from it with llama-quantize."""
    out = artifact_dir(model_dir) / "gguf" / f"{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "f32":
        _run([str(PEER_PYTHON), str(HERE / "gguf_convert.py"), str(LLAMA_DIR / "convert"), str(peer_source(model_dir)),
              "--outfile", str(out) + ".tmp", "--outtype", "f32"], log)
    else:
        _run([str(LLAMA_DIR / "bin" / "llama-quantize"), str(gguf(model_dir, "f32", log)), str(out) + ".tmp",
              kind.upper()], log)
    Path(str(out) + ".tmp").rename(out)
    return out


def ortgenai(model_dir: Path, precision: str, num_threads: int, log) -> Path:
    """onnxruntime-genai's model builder (-p fp32|int4 -e cpu); intra_op_num_threads set in its config."""
    out = artifact_dir(model_dir) / f"ortgenai-{precision}"
    if not (out / "genai_config.json").is_file():
        _run([str(PEER_PYTHON), "-m", "onnxruntime_genai.models.builder", "-i", str(peer_source(model_dir)),
              "-o", str(out),
              "-p", precision, "-e", "cpu", "-c", str(artifact_dir(model_dir) / "ortgenai-cache")], log)
    config_file = out / "genai_config.json"
    config = json.loads(config_file.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if options.get("intra_op_num_threads") != num_threads:
        options["intra_op_num_threads"] = num_threads
        config_file.write_text(json.dumps(config, indent=4) + "\n")
    return out


def _weights_sha256(model_dir: Path) -> dict[str, str]:
    import hashlib

    digests = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        digests[file.name] = digest.hexdigest()
    return digests


def runner_numerics() -> list[Path]:
    """The code a quantized export's quality gate ran through (export quantize measures it through the
    runner as it serves: Lepton's operators, their rewrites, the slots), as the Makefile's RUNNER_NUMERICS."""
    runners = PROJECT_ROOT / "lepton" / "runners"
    return [*sources(), *runners.glob("*_graph.py"), runners / "slot_runner.py"]


def gated_before_change(export_dir: Path) -> bool:
    """A quantized export whose gate was measured before the runner's numerics last changed."""
    manifest = export_dir / "manifest.json"
    quantized = json.loads(manifest.read_text()).get("quantization") is not None
    return quantized and manifest.stat().st_mtime < max(p.stat().st_mtime for p in runner_numerics())


def existing_lepton_export(model_dir: Path, precision: str) -> Path | None:
    """An export of exactly these weights already built by `make` (build/onnx/*), of that precision, its
    quality gate measured with the runner's current code."""
    weights = None
    for manifest_file in sorted((PROJECT_ROOT / "build" / "onnx").glob("*/manifest.json")):
        manifest = json.loads(manifest_file.read_text())
        method = (manifest.get("quantization") or {}).get("method", "fp32")
        if (method != precision or manifest.get("source", {}).get("path") != str(model_dir)
                or gated_before_change(manifest_file.parent)):
            continue
        weights = weights or _weights_sha256(model_dir)
        if manifest["source"].get("weights_sha256") == weights:
            return manifest_file.parent
    return None


def lepton_onnx(model_dir: Path, precision: str, log) -> tuple[Path, str]:
    """Lepton's own export (python -m export onnx / quantize); returns (folder, note on how it was built).

    An export of the same weights that `make` built under build/onnx/ is used as it is.
    """
    found = existing_lepton_export(model_dir, precision)
    if found is not None:
        log(f"using {found} (an export of these weights built before)")
        return found, f"reused {os.path.relpath(found, PROJECT_ROOT)}"
    base = artifact_dir(model_dir) / "lepton-onnx-fp32"
    if precision == "fp32" or not (base / "manifest.json").is_file():
        export = [sys.executable, "-m", "export", "onnx", "--model", str(model_dir), "--out", str(base)]
        base_note = _build(base, export, "--skip-validation", ("validation",), log)
        if precision == "fp32":
            return base, base_note
    out = artifact_dir(model_dir) / f"lepton-onnx-{precision}"
    quantize = [sys.executable, "-m", "export", "quantize", "--export", str(base), "--out", str(out),
                "--method", precision]
    # NOTE: on a model with random weights the quality gate measures nothing useful; speed is measured anyway.
    return out, _build(out, quantize, "--no-quality-gate", ("quality", "gate"), log)


def bf16_weights_quality(export_dir: Path, log) -> tuple[bool, str]:
    """The quality report of serving a float32 export with weight_dtype=bfloat16 (export.runner_quality,
    computed here unless up to date): (passed, note)."""
    from lepton.autoselect import report_path

    _run([sys.executable, "-m", "export.runner_quality", "--runner", "onnxruntime", "--reference", str(export_dir)], log)
    report = report_path(export_dir, "onnxruntime", "bfloat16")
    variants = json.loads(report.read_text()).get("variants", [])
    failures = [f for v in variants for f in v.get("failures", [])]
    where = os.path.relpath(report, PROJECT_ROOT)
    if failures or not variants:
        return False, f"bfloat16 weights fail their quality gate ({where}): " + "; ".join(failures)[:200]
    return True, f"bfloat16 weights: quality gate passed ({where})"


def _build(out: Path, command: list[str], relax_flag: str, relax_words: tuple[str, ...], log) -> str:
    """Run command unless out has a manifest (of a quantized export: one gated with the runner's current
    code); on a check failure (relax_words), once more with relax_flag."""
    note_file = out.with_name(out.name + ".note.txt")
    if (out / "manifest.json").is_file() and gated_before_change(out):
        log(f"{out}: its quality gate ran before the runner's code changed: quantizing again")
        shutil.rmtree(out)
    if (out / "manifest.json").is_file():
        return note_file.read_text().strip() if note_file.is_file() else ""
    try:
        _run(command, log)
        note = "built here, checks passed"
    except ArtifactError as exc:
        if not any(word in str(exc).lower() for word in relax_words):
            raise
        _run(command + [relax_flag], log)
        note = f"built here with {relax_flag}: " + str(exc).splitlines()[0][:200]
    note_file.write_text(note + "\n")
    return note


def weight_bytes_on_disk(path: Path) -> int:
    """Bytes of the artifact's weight files (.gguf, .onnx + .onnx.data, .safetensors)."""
    if path.is_file():
        return path.stat().st_size
    patterns = ("*.onnx", "*.onnx.data", "*.onnx_data", "*.safetensors", "*.data")
    files = {f for pattern in patterns for f in path.glob(pattern)}
    return sum(f.stat().st_size for f in files)
