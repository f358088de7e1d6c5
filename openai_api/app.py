"""The FastAPI application: routes, error handlers in OpenAI's format, the Triton client's lifetime."""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from openai_api.chat import create_chat_completion
from openai_api.completions import create_completion
from openai_api.config import ApiConfig
from openai_api.errors import ApiError, bad_request, internal
from openai_api.generation import Service
from openai_api.logprobs import TokenTexts
from openai_api.middleware import Gatekeeper
from openai_api.schema import ChatCompletionRequest, CompletionRequest
from openai_api.triton import ModelInfo, TritonBackend

logger = logging.getLogger("openai_api")
# NOTE: pydantic names the member of a union that failed (`stop.str`, `stop.list[str]`); not a field
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def served_model_name(config: ApiConfig, model_info: ModelInfo) -> str:
    """--served-model-name, else the served folder's name, else the Triton model's name."""
    if config.served_model_name:
        return config.served_model_name
    return model_info.model_dir.name if model_info.model_dir is not None else config.triton_model


def create_app(config: ApiConfig, model_info: ModelInfo) -> FastAPI:
    """The API for one Triton model whose config was read already (see triton.fetch_model_info)."""
    service = Service(
        backend=TritonBackend(config.triton_url, config.triton_model), model_info=model_info,
        served_model_name=served_model_name(config, model_info),
        tokens=TokenTexts.from_model_dir(config.model_dir or model_info.model_dir), created=int(time.time()),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.backend.open()  # NOTE: grpc.aio needs the serving event loop
        yield
        await service.backend.close()

    app = FastAPI(title="Lepton OpenAI-compatible API", version="1", lifespan=lifespan)
    app.state.service = service
    app.state.draining = threading.Event()  # NOTE: set by ApiServer.drain(): every new request gets 503
    _add_error_handlers(app)
    _add_routes(app, service)
    app.add_middleware(Gatekeeper, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       draining=app.state.draining)
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    def model_card() -> dict:
        return {"id": service.served_model_name, "object": "model", "created": service.created, "owned_by": "lepton"}

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = await service.backend.is_ready()
        return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def retrieve_model(model: str) -> dict:
        service.check_model(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await create_completion(await parse_body(request, CompletionRequest), request, service)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await create_chat_completion(await parse_body(request, ChatCompletionRequest), request, service)


async def parse_body(request: Request, schema: type[BaseModel]):
    """The JSON body as `schema`, whatever the Content-Type says (curl -d sends a form type)."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return internal(f"internal error: {exc}").response()


def validation_error(errors) -> ApiError:
    """The first of pydantic's errors as a 400 naming the field (`param`: its top-level name)."""
    error = list(errors)[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [part for part in error.get("loc", ()) if part != "body" and not _UNION_TAG.match(str(part))]
    if error.get("type") == "json_invalid":
        return bad_request(f"The body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}",
                           code="invalid_json")
    if not loc:
        return bad_request(f"The body must be a JSON object: {error['msg']}")
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
    if error.get("type") == "extra_forbidden":
        return bad_request(f"{where}: unrecognized request argument", param=str(loc[0]))
    return bad_request(f"{where}: {error['msg']}", param=str(loc[0]))
