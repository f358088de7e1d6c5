"""Start a real `tritonserver` (from the nvidia-pytriton wheel) on Lepton's model repository.

Used by `make serve` and by the end-to-end tests, so both run the same server the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from lepton.instances import write_instance_groups
from lepton.lifetime import accepts, descendants, kill_tree, kill_with_parent, port_in_use
from lepton.memory import HUGE_PAGES_SETTING, huge_pages_wanted, transparent_huge_pages
from lepton.shutdown import (
    CONTROL_KEY_HEADER, DRAINED_PREFIX, DRAINING_PREFIX, DrainAck, drain_acks, num_engines, refuse_readiness,
    request_drain, wait_for_files,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOURCE_REPOSITORY = PROJECT_ROOT / "model_repository"
MODEL_NAME = "lepton"
# NOTE: the measured winner on a 2-core host (docs/benchmarks-instances.md).
DEFAULT_INSTANCES = 1
TOKENIZER_MODEL = "tokenizer"
EMBEDDINGS_MODEL = "embeddings"


def triton_home() -> Path:
    """The tritonserver install carried by the nvidia-pytriton wheel."""
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


@dataclass
class ServerOptions:
    """Where to listen and what to serve."""

    model_dir: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    engine_parameters: dict[str, str] = field(default_factory=dict)  # config.pbtxt overrides
    # NOTE: engine instances of the lepton model (lepton/instances.py): this many KIND_CPU instances
    # (0: as config.pbtxt has it), or with gpus one KIND_GPU instance on each.
    instances: int = 0
    gpus: tuple[int, ...] = ()
    # NOTE: a safetensors folder for the embeddings model; None: model_dir, or the folder an export of
    # model_dir came from; when there is none (or serve_embeddings is false), the model is left out.
    embeddings_model_dir: Path | None = None
    serve_embeddings: bool = True
    work_dir: Path | None = None  # where the served repository copy goes; default build/triton/<http_port>
    log_verbose: int = 0
    # NOTE: how long a drain lets running requests finish before they are cancelled (lepton/shutdown.py).
    drain_timeout_s: float = 10.0
    # NOTE: how long a stop waits for tritonserver's own graceful exit before killing its tree.
    stop_timeout_s: float = 10.0


def prepare_repository(options: ServerOptions) -> Path:
    """Copy model_repository/ to work_dir with the engine parameters and model folders written into config.pbtxt."""
    work_dir = options.work_dir or PROJECT_ROOT / "build" / "triton" / str(options.http_port)
    repo = work_dir / "model_repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(SOURCE_REPOSITORY, repo, ignore=shutil.ignore_patterns("__pycache__"))
    model_dir = str(Path(options.model_dir).resolve())
    set_model_parameters(repo / MODEL_NAME, {"model_dir": model_dir, **options.engine_parameters})
    set_model_parameters(repo / TOKENIZER_MODEL, {"model_dir": model_dir})  # NOTE: the engine's own token ids
    embeddings_dir = embeddings_folder(options)
    if embeddings_dir is None:
        shutil.rmtree(repo / EMBEDDINGS_MODEL)
    else:
        set_model_parameters(repo / EMBEDDINGS_MODEL, {"model_dir": str(Path(embeddings_dir).resolve())})
    write_instance_groups(repo, options.instances, options.gpus)
    return repo


def set_model_parameters(model: Path, values: dict[str, str]) -> None:
    """Write values into the parameters of model/config.pbtxt."""
    from tritonclient.grpc import model_config_pb2

    config_file = model / "config.pbtxt"
    config = text_format.Parse(config_file.read_text(), model_config_pb2.ModelConfig())
    for key, value in values.items():
        config.parameters[key].string_value = str(value)
    config_file.write_text(text_format.MessageToString(config))


def embeddings_folder(options: ServerOptions) -> Path | None:
    """The folder the embeddings model serves, or None when it is not served."""
    if not options.serve_embeddings:
        return None
    return options.embeddings_model_dir or weights_folder(Path(options.model_dir))


def weights_folder(model_dir: Path) -> Path | None:
    """model_dir when it holds safetensors weights, else the folder its ONNX export came from, if intact."""
    if any(model_dir.glob("*.safetensors")):
        return model_dir
    try:
        source = json.loads((model_dir / "manifest.json").read_text())["source"]
        folder = Path(source["path"])
        config_hash = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # NOTE: the manifest's path is informational; a folder whose config changed since is another model.
    return folder if config_hash == source.get("config_sha256") and any(folder.glob("*.safetensors")) else None


def server_environment() -> dict[str, str]:
    """PATH and LD_LIBRARY_PATH so the Python backend stub runs this interpreter's packages."""
    env = dict(os.environ)
    # NOTE: the stub links the system libpython; the interpreter's own LIBDIR must come first or
    # threading breaks (`_thread.RLock` has no `_recursion_count`), see docs/platform.md.
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


def server_command(options: ServerOptions, repo: Path, control_key: str | None = None) -> list[str]:
    """tritonserver's command line; control_key: what a model-repository call (load, unload) must carry in the
    CONTROL_KEY_HEADER header (None: a random key, so no client can make one)."""
    home = triton_home()
    restricted = f"model-repository:{CONTROL_KEY_HEADER}={control_key or secrets.token_hex(16)}"
    return [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={home / 'backends'}",
        f"--http-address={options.host}", f"--http-port={options.http_port}",
        f"--grpc-address={options.host}", f"--grpc-port={options.grpc_port}",
        f"--metrics-address={options.host}", f"--metrics-port={options.metrics_port}",
        "--allow-gpu-metrics=false",
        "--exit-on-error=true",
        # NOTE: every model loads as before; explicit control lets a drain turn readiness off (lepton/shutdown.py)
        "--model-control-mode=explicit", "--load-model=*",
        # NOTE: explicit control opens the model-repository API (load and unload); only the launcher may call it
        f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
        f"--exit-timeout-secs={max(1, int(options.stop_timeout_s) - 2)}",
        f"--log-verbose={options.log_verbose}",
    ]


class TritonServer:
    """A tritonserver child process; a context manager that waits for readiness and stops it."""

    def __init__(self, options: ServerOptions, log_file: Path | None = None) -> None:
        self.options = options
        self.log_file = log_file
        self.process: subprocess.Popen | None = None
        self.repository: Path | None = None
        self.control_key = secrets.token_hex(16)

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def start(self, timeout: float = 180.0) -> "TritonServer":
        repo = self.repository = prepare_repository(self.options)
        out = open(self.log_file, "w") if self.log_file else None
        # NOTE: a session of its own (a terminal's Ctrl-C reaches the launcher, which stops it in
        # order), and SIGKILL when the launcher dies, however it dies.
        self.process = subprocess.Popen(
            server_command(self.options, repo, self.control_key), env=server_environment(),
            stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True,
            preexec_fn=kill_with_parent,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until HTTP says ready and the metrics and gRPC endpoints answer too: tritonserver starts its
        endpoints one after another, so HTTP can be ready while the metrics port still refuses."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}{self._log_hint()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    ready = response.status == 200
                if ready:
                    with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                        response.read()
                    if accepts(self.options.host, self.options.grpc_port):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s{self._log_hint()}")

    def drain(self) -> list[DrainAck]:
        """New requests refused, readiness off, running ones finished or cancelled by the drain timeout
        (lepton/shutdown.py); returns each engine's report. stop() then finds nothing in flight."""
        if self.process is None or self.process.poll() is not None:
            return []
        model_dir = self.repository / MODEL_NAME
        num_instances = num_engines(model_dir)
        request_drain(model_dir, self.options.drain_timeout_s)
        # NOTE: readiness goes off once the engines refuse new requests, so a client that sees it off
        # and tries anyway gets the clear error (about 50 ms, the watchers' polling interval).
        num_draining = wait_for_files(model_dir, DRAINING_PREFIX, num_instances, 2.0, self.process)
        refuse_readiness(self.http_url, self.control_key)
        # NOTE: an engine that did not start draining is stuck: stop() ends it. Past the deadline the others
        # need a moment to send the cancelled requests' last responses.
        wait_for_files(model_dir, DRAINED_PREFIX, num_draining, self.options.drain_timeout_s + 5, self.process)
        return drain_acks(model_dir)

    def stop(self, timeout: float | None = None) -> None:
        """SIGINT (Triton's graceful shutdown); past the timeout, SIGKILL to the whole tree."""
        if self.process is None:
            return
        tree = descendants(self.process.pid)  # NOTE: before tritonserver exits and its stubs lose it
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(self.options.stop_timeout_s if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                tree = sorted(set(tree) | set(descendants(self.process.pid)))
                kill_tree(self.process.pid)
                self.process.wait()
        for pid in tree:  # NOTE: a stub left behind by tritonserver (stuck, or stopped) goes too
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _log_hint(self) -> str:
        return f"; see {self.log_file}" if self.log_file else ""

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _parse_args(argv: list[str] | None):
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lepton.server",
        description="Serve a local Llama / Qwen2 / Mistral folder with tritonserver and the Lepton engine.",
    )
    parser.add_argument("--model", type=Path, required=True, help="local Hugging Face model folder")
    parser.add_argument("--embeddings-model", type=Path, metavar="DIR",
                        help="safetensors Llama / Qwen2 / Mistral folder the `embeddings` model serves (default: "
                             "--model, or the folder its ONNX export came from; with neither, no embeddings model)")
    parser.add_argument("--no-embeddings", action="store_true",
                        help="leave the embeddings model out (it holds a copy of the weights per instance)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind HTTP, gRPC and metrics to (default: loopback)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="engine parameter written into config.pbtxt (repeatable), e.g. max_num_seqs=16")
    parser.add_argument("--instances", type=int, metavar="N",
                        help="engine instances of the model, Triton spreading requests across them: on the CPU, "
                             "each pinned to its share of the cores with its share of the KV cache (default: "
                             f"{DEFAULT_INSTANCES}, docs/benchmarks-instances.md); with runner=tensorrt, one on each "
                             "of the first N GPUs (default: every GPU)")
    parser.add_argument("--api-port", type=int, default=9000,
                        help="port of the OpenAI-compatible API (openai_api) started with Triton; 0 = none")
    parser.add_argument("--api-key", default=os.environ.get("LEPTON_API_KEY"),
                        help="key the OpenAI API requires (default: $LEPTON_API_KEY; none: no key)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name OpenAI API clients pass as `model` (default: the name of the --model "
                             "folder, whichever configuration --auto serves)")
    parser.add_argument("--auto", action="store_true",
                        help="unless --param runner=... is given: time the model's eligible configurations on "
                             "this processor (torch, and its ONNX exports under build/onnx whose quality gate "
                             "passed) and serve the fastest; prints what it chose and why")
    parser.add_argument("--drain-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on Ctrl-C / SIGTERM: readiness turns false and new requests are refused at once; "
                             "running requests get this long to finish, then the rest are cancelled (finish_reason "
                             "cancelled) and the server stops (default: 10)")
    parser.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="after the drain, how long to wait for tritonserver's graceful exit before killing "
                             "it and its backend processes (default: 10)")
    parser.add_argument("--log-verbose", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from lepton.config import EngineConfig
    from lepton.errors import ModelFolderError
    from lepton.model_folder import ModelFolder
    from lepton.runners import open_folder

    args = _parse_args(argv)
    params = dict(item.split("=", 1) for item in args.param if "=" in item)
    if len(params) != len(args.param):
        sys.exit("error: --param takes KEY=VALUE")
    # NOTE: the API's model name is fixed before --auto swaps the folder for an export of it, so clients
    # keep one name whichever configuration this processor gets.
    args.served_model_name = args.served_model_name or Path(args.model).resolve().name
    if args.auto and "runner" not in params:
        chosen_threads = "num_threads" not in params
        args.model, params = _auto_configuration(args.model, params)
        if chosen_threads and (args.instances or DEFAULT_INSTANCES) > 1:
            params.pop("num_threads")  # NOTE: timed for one engine on all cores; instances compute on their own
    # NOTE: fail here, with a clear message, before starting the server
    open_folder(EngineConfig.from_parameters({"model_dir": str(args.model), **params}))
    if args.embeddings_model is not None:
        try:
            ModelFolder.open(args.embeddings_model)
        except ModelFolderError as exc:
            sys.exit(f"error: --embeddings-model: {exc}")
    ports = [("HTTP", args.http_port), ("gRPC", args.grpc_port), ("metrics", args.metrics_port)]
    for name, port in ports + ([("API", args.api_port)] if args.api_port else []):
        if port_in_use(args.host, port):
            sys.exit(f"error: the {name} port {args.host}:{port} is already in use (another Lepton or "
                     f"tritonserver?); stop it or choose another port (--{name.lower()}-port, or "
                     f"{name.upper()}_PORT=... with make serve)")
    options = ServerOptions(
        model_dir=args.model, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, engine_parameters=params, embeddings_model_dir=args.embeddings_model,
        serve_embeddings=not args.no_embeddings,
        log_verbose=args.log_verbose,
        drain_timeout_s=args.drain_timeout, stop_timeout_s=args.stop_timeout,
        **_instances(args.instances, params.get("runner")),
    )
    server = TritonServer(options)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # docker stop / timeout: stop cleanly
    api, serving = None, False
    try:
        server.start()
        api = _start_api(args) if args.api_port else None
        print(_ready_banner(server, time.monotonic() - started), flush=True)
        if api is not None:
            from openai_api.server import snippet

            print("\n" + snippet(api.url, api.model, api.config.api_key is not None), flush=True)
        serving = True
        server.process.wait()
        return server.process.returncode or 0
    except KeyboardInterrupt:
        # NOTE: a second Ctrl-C / SIGTERM must not cut the stop short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if serving:
            print(f"\nshutting down: new requests refused, running ones get {args.drain_timeout:g} s ...", flush=True)
            if api is not None:
                api.drain()
            print(_drain_summary(server.drain(), num_engines(server.repository / MODEL_NAME)), flush=True)
        print("stopping tritonserver ...", flush=True)
        return 0
    finally:
        if api is not None:
            # NOTE: a daemon thread of this process, so it cannot outlive the launcher; streams get a
            # moment to end, and a shutdown stuck on a dead Triton does not hold the exit up.
            api.stop(timeout_s=3)
        server.stop()


def _instances(count: int | None, runner: str | None) -> dict:
    """ServerOptions' instances and gpus for --instances: GPUs for the tensorrt runner, else cores."""
    if count is not None and count < 1:
        sys.exit(f"error: --instances must be >= 1, got {count}")
    if runner != "tensorrt":
        return {"instances": count or DEFAULT_INSTANCES}
    import torch

    available = torch.cuda.device_count()
    if (count or 0) > available:
        sys.exit(f"error: --instances {count}: this host has {available} GPU(s)")
    return {"gpus": tuple(range(count or available))}


def _start_api(args):
    """The OpenAI-compatible API in a thread of the launcher, in front of tritonserver's gRPC port."""
    from openai_api.config import ApiConfig
    from openai_api.server import ApiServer

    triton_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    config = ApiConfig(host=args.host, port=args.api_port, triton_url=f"{triton_host}:{args.grpc_port}",
                       api_key=args.api_key, served_model_name=args.served_model_name, log_level="warning")
    return ApiServer(config).start()


def _auto_configuration(model: Path, params: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """The fastest eligible configuration of model on this processor (lepton.autoselect)."""
    from lepton.autoselect import choose

    build = PROJECT_ROOT / "build"
    choice = choose(model, build / "onnx", build / "autoselect")
    print(choice.explain(), flush=True)
    return choice.candidate.model_dir, choice.candidate.engine_parameters() | params  # NOTE: what the user set wins


def _drain_summary(acks: list[DrainAck], num_instances: int) -> str:
    in_flight, cancelled = sum(a.num_in_flight for a in acks), sum(a.num_cancelled for a in acks)
    seconds = max((a.seconds for a in acks), default=0.0)
    missing = ""
    if len(acks) < num_instances:
        missing = f"; {num_instances - len(acks)} of {num_instances} engines did not report"
    return (f"drained in {seconds:.1f} s: {in_flight} requests were in flight, {in_flight - cancelled} finished, "
            f"{cancelled} cancelled at the deadline{missing}")


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _huge_pages_line() -> str:
    """Whether the engines put their weights in transparent huge pages, and the kernel's mode."""
    mode = transparent_huge_pages()
    if not huge_pages_wanted():
        setting = os.environ.get(HUGE_PAGES_SETTING, "unset")
        return f"no transparent huge pages asked for ({HUGE_PAGES_SETTING}={setting}; the kernel's mode: {mode})"
    return (f"the ONNX Runtime engines collapse their weights into transparent huge pages (the kernel's "
            f"mode: {mode}; {HUGE_PAGES_SETTING}=0: not)")


def _ready_banner(server: TritonServer, seconds: float) -> str:
    http, grpc = server.http_url, server.grpc_url
    folder = embeddings_folder(server.options)
    embeddings = (f"embeddings ({folder})" if folder else "no embeddings" if not server.options.serve_embeddings
                  else "no embeddings (no safetensors folder; --embeddings-model)")
    return f"""
Lepton is ready ({seconds:.1f} s): model '{MODEL_NAME}' serving {server.options.model_dir}
  HTTP {http}   gRPC {grpc}   metrics {server.metrics_url}

  curl -s http://{http}/v2/models/{MODEL_NAME}/generate -d '{{"text_input": "The quick brown fox", "max_tokens": 32}}'
  curl -sN http://{http}/v2/models/{MODEL_NAME}/generate_stream -d '{{"text_input": "Hello", "max_tokens": 32, "stream": true}}'
  .venv/bin/python -m client generate "The quick brown fox" --stream --protocol grpc --url {grpc}
  .venv/bin/python -m client health --url {http}

  also served: tokenizer, lepton_ensemble (tokenizer -> {MODEL_NAME}), {embeddings}
  memory: {_huge_pages_line()}

Ctrl-C stops the server."""


if __name__ == "__main__":
    sys.exit(main())
