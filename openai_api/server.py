"""Run the API with uvicorn: `serve()` in the foreground, `ApiServer` in a background thread."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import uvicorn

from openai_api.app import create_app
from openai_api.config import API_KEY_ENV, DEFAULT_MAX_BODY_BYTES, ApiConfig
from openai_api.triton import fetch_model_info

GRACEFUL_SHUTDOWN_S = 5  # NOTE: then open streams are cancelled, and so are their Triton requests


def build_app(config: ApiConfig):
    """Wait for Triton's model, read its config, and make the app."""
    return create_app(config, fetch_model_info(config.triton_url, config.triton_model, config.triton_timeout_s))


def _uvicorn_config(config: ApiConfig) -> uvicorn.Config:
    _check_port(config.host, config.port)
    return uvicorn.Config(build_app(config), host=config.host, port=config.port, log_level=config.log_level,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, server_header=False)


def serve(config: ApiConfig) -> None:
    """Serve in this thread until Ctrl-C or SIGTERM."""
    server = uvicorn.Server(_uvicorn_config(config))
    print(snippet(f"http://{config.host}:{config.port}/v1", server.config.app.state.service.served_model_name,
                  config.api_key is not None), flush=True)
    server.run()


class ApiServer:
    """The API in a daemon thread of this process: start() returns once it listens; stop() ends it."""

    def __init__(self, config: ApiConfig) -> None:
        self.config = config
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:9000/v1."""
        return f"http://{self.config.host}:{self.config.port}/v1"

    @property
    def model(self) -> str:
        return self._server.config.app.state.service.served_model_name

    def start(self, timeout_s: float = 30.0) -> "ApiServer":
        self._server = uvicorn.Server(_uvicorn_config(self.config))
        self._thread = threading.Thread(target=self._server.run, name="openai-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the OpenAI API did not start on {self.config.host}:{self.config.port}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the OpenAI API did not start within {timeout_s:g} s")
            time.sleep(0.05)
        return self

    def drain(self) -> None:
        """Answer every new request with 503 (server shutting down); requests already in go on."""
        if self._server is not None:
            self._server.config.app.state.draining.set()

    def stop(self, timeout_s: float = GRACEFUL_SHUTDOWN_S + 5) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout_s)

    def __enter__(self) -> "ApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def snippet(base_url: str, model: str, needs_key: bool) -> str:
    """How to call the API with the `openai` client, for a ready banner."""
    key = f'os.environ["{API_KEY_ENV}"]' if needs_key else '"unused"'
    imports = "import os, openai" if needs_key else "import openai"
    return f"""OpenAI-compatible API on {base_url} (model "{model}"):
  {imports}
  client = openai.OpenAI(base_url="{base_url}", api_key={key})
  for chunk in client.chat.completions.create(model="{model}", stream=True,
          messages=[{{"role": "user", "content": "What is the capital of France?"}}]):
      print(chunk.choices[0].delta.content or "", end="", flush=True)"""


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {host}:{port} ({exc.strerror}); is another API running? "
                               f"choose another --port") from None


def parse_args(argv: list[str] | None = None) -> ApiConfig:
    parser = argparse.ArgumentParser(
        prog="python -m openai_api",
        description="An OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions, /health) "
                    "in front of Lepton's Triton model, over Triton's gRPC client. Triton must be running.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, default=9000, help="port to bind (default: 9000)")
    parser.add_argument("--triton-url", default="127.0.0.1:8001", help="Triton's gRPC HOST:PORT (default: 127.0.0.1:8001)")
    parser.add_argument("--triton-model", default="lepton", help="the decoupled Triton model (default: lepton)")
    parser.add_argument("--served-model-name", help="the `model` clients send (default: the name of the folder "
                        "Triton serves, from its model_dir parameter)")
    parser.add_argument("--model-dir", type=Path, help="folder with tokenizer.json, for the token strings of "
                        "logprobs (default: Triton's model_dir when it is on this machine; without one, "
                        "tokens are shown as token_id:<id>)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require `Authorization: Bearer <key>` on /v1 (default: ${API_KEY_ENV}; "
                             "unset: no key needed)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    parser.add_argument("--triton-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="how long to wait at start for Triton's model to be ready (default: 30)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    try:
        return ApiConfig(
            host=args.host, port=args.port, triton_url=args.triton_url, triton_model=args.triton_model,
            served_model_name=args.served_model_name, model_dir=args.model_dir, api_key=args.api_key or None,
            max_body_bytes=args.max_body_bytes, triton_timeout_s=args.triton_timeout, log_level=args.log_level,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    try:
        serve(config)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
