"""onnxruntime-genai: runs ortgenai_worker.py in build/peers/venv and turns its times into records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from benchmarks.loadgen import RequestRecord
from benchmarks.peers.workloads import Workload
from lepton.server import PROJECT_ROOT

PEER_PYTHON = PROJECT_ROOT / "build" / "peers" / "venv" / "bin" / "python"
WORKER = Path(__file__).with_name("ortgenai_worker.py")


def run_workloads(model_dir: Path, workloads: list[Workload], ids: dict[str, list[int]], work_dir: Path,
                  log) -> tuple[dict[str, list[RequestRecord]], str]:
    """All workloads in one worker process (the model loads once); records per workload, og version."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job = {"model": str(model_dir), "workloads": [
        {"name": w.name, "concurrency": w.concurrency, "requests": [
            {"id": s.request_id, "ids": ids[s.request_id], "max_tokens": s.max_tokens, "arrival_s": s.arrival_s}
            for s in w.specs]}
        for w in workloads]}
    job_file, result_file = work_dir / "job.json", work_dir / "result.json"
    job_file.write_text(json.dumps(job))
    result_file.unlink(missing_ok=True)
    process = subprocess.Popen([str(PEER_PYTHON), str(WORKER), str(job_file), str(result_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        log(line.rstrip())
    if process.wait() != 0:
        raise RuntimeError(f"onnxruntime-genai worker failed with exit code {process.returncode}")
    result = json.loads(result_file.read_text())
    records = {}
    for w in workloads:
        got = result["results"][w.name]
        records[w.name] = [_record(spec, got[spec.request_id], len(ids[spec.request_id])) for spec in w.specs]
    return records, result["version"]


def _record(spec, got: dict, num_input_tokens: int) -> RequestRecord:
    record = RequestRecord(spec, sent_s=got["sent_s"], done_s=got["done_s"], num_input_tokens=num_input_tokens,
                           finish_reason="length")
    record.responses = [(t, n, 1) for t, n in got["responses"]]
    return record
