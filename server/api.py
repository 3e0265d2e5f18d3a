"""The OpenAI chat-completions API over saved policy versions (`safesteer serve`).

`POST /v1/chat/completions` answers with the policy version the request's `model` names
(`policy@7`, `policy@latest`, or the bare model), streaming or not; `GET /v1/models` lists what
can be asked for; `GET /health` says whether the server is up and how busy. Concurrent requests
are answered together by one `Batcher`. Every error has OpenAI's shape, so existing clients show
it: `{"error": {"message", "type", "param", "code"}}`.

Which version answered and which categories' gates fired come back in the `X-SafeSteer-Version`
and `X-SafeSteer-Fired` headers and in a `safesteer` field of the response (and of the last
chunk when streaming).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import iterate_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from safesteer.batching import Batcher, Completion, Job, QueueFull
from safesteer.errors import SafeSteerError
from safesteer.limits import max_prompt_tokens
from safesteer.models import LoadedModel
from safesteer.sampling import Sampling

from .resolver import PolicyResolver, Resolved, UnknownModel

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """Limits and switches; every one has a safe default."""

    api_keys: tuple[str, ...] = ()  # empty: no authentication (bind to 127.0.0.1 then)
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_messages: int = 64
    timeout_s: float = 120.0
    max_batch: int = 16
    max_wait_s: float | None = None  # how long an idle engine's first request waits for company; None: its own default
    max_queue: int = 64
    cores: int | None = None  # PyTorch threads for the batching worker (`safesteer.threads`); None: as they are
    fast_lane: bool = True  # requests about to finish step on their own (`batching.FastLane`)
    audit: bool = False  # record each answer (policy, version, fired categories) in the audit log
    audit_prompts: bool = False  # ...with the prompt text too
    extra: dict[str, Any] = field(default_factory=dict)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param} is not supported: {why}", "invalid_request_error", "unsupported_parameter", param)


class ContentPart(BaseModel):
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if part.type == "text")


class ChatRequest(BaseModel):
    model: str = Field(max_length=400)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    n: int = 1
    stop: str | list[str] | None = None
    # Greedy unless `temperature` > 0 (reproducible with a `seed`); settings that would change the
    # answer in ways this server does not implement are refused with a message, never ignored.
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None

    def sampling(self) -> Sampling | None:
        """None (greedy) unless a temperature above 0 asks for sampling."""
        if not self.temperature:
            return None
        return Sampling(temperature=self.temperature, top_p=self.top_p or 1.0, seed=self.seed)

    def stops(self) -> tuple[str, ...]:
        given = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in given if s)

    def refuse_what_is_not_implemented(self) -> None:
        """Name every setting that would change the answer in a way this server does not do."""
        if self.n != 1:
            raise _unsupported("n", "one answer per request; send several requests (with different seeds)")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise _unsupported(name, "penalties are not applied; send 0 or leave it out")
        if self.logit_bias:
            raise _unsupported("logit_bias", "token biases are not applied")
        if self.logprobs or self.top_logprobs:
            raise _unsupported("logprobs", "log probabilities are not returned")
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise _unsupported("tools", "tool calls are not available")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise _unsupported("response_format", "only text answers")
        if len(self.stops()) > 4 or any(len(s) > 200 for s in self.stops()):
            raise ApiError(400, "at most 4 stop sequences of 200 characters", "invalid_request_error", None, "stop")
        for index, message in enumerate(self.messages):
            if not isinstance(message.content, str) and any(part.type != "text" for part in message.content):
                raise _unsupported(f"messages.{index}.content", "only text parts (this model reads no images)")


def _check_key(request: Request, settings: ServeSettings) -> str:
    """The caller's key id (its position), or raise 401; every key is compared in constant time."""
    if not settings.api_keys:
        return "anonymous"
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    matches = [hmac.compare_digest(given.encode(), key.encode()) for key in settings.api_keys]
    if not given or not any(matches):
        raise ApiError(401, "missing or invalid API key", "authentication_error", "invalid_api_key")
    return f"api-key-{matches.index(True) + 1}"


def create_app(
    lm: LoadedModel,
    store: Any,
    settings: ServeSettings | None = None,
    base_name: str = "",
    engine: Callable[[LoadedModel, ServeSettings], Any] | None = None,
) -> FastAPI:
    """The server as a FastAPI app (run it with uvicorn); `store` is a `db.PolicyStore`.

    `engine` makes what answers the requests (`Batcher`'s interface) from the model and settings:
    by default the project's own `Batcher`; `vllm_engine.VllmBatcher` serves the same API through vLLM.
    """
    settings = settings or ServeSettings()
    resolver = PolicyResolver(store, lm, base_name or lm.identity.model_id)
    batcher: Any = None  # a `Batcher`, or what `engine` made

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal batcher
        batcher = (
            engine(lm, settings)
            if engine is not None
            else Batcher(
                lm,
                max_batch=settings.max_batch,
                max_wait_s=settings.max_wait_s,
                max_queue=settings.max_queue,
                cores=settings.cores,
                fast_lane=settings.fast_lane,
            )
        )
        app.state.batcher = batcher
        yield
        batcher.close()  # graceful: requests already taken are answered first

    app = FastAPI(title="SafeSteer policy server", lifespan=lifespan)
    app.state.resolver = resolver

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and methods in OpenAI's error shape, like every other error."""
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind, code).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        """Anything unforeseen: logged here, and a JSON 500 there, never a plain-text page."""
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return ApiError(500, "the server could not answer this request", "server_error", "internal_error").response()

    @app.get("/health")
    async def health() -> JSONResponse:
        """The engine's real state: 503 when its worker is down and could not be restarted."""
        running = batcher is not None and batcher.ensure_running()
        body = {
            "status": "ok" if running else "unhealthy",
            "model": resolver.base_name,
            "waiting": batcher.waiting if batcher else 0,
            "worker": "running" if running else "stopped",
            "worker_restarts": batcher.restarts if batcher else 0,
            "failed_batches": batcher.failed_batches if batcher else 0,
        }
        return JSONResponse(body, status_code=200 if running else 503)

    def _model(name: str, created: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "safesteer"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _check_key(request, settings)
        created = int(time.time())
        names = await asyncio.to_thread(resolver.names)
        return {"object": "list", "data": [_model(n, created) for n in names]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        _check_key(request, settings)
        resolved = await asyncio.to_thread(_resolve, resolver, model)
        return _model(model if resolved.version is None else resolved.name, int(time.time()))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        caller = _check_key(request, settings)
        chat = _parse(await _body(request, settings), settings)
        resolved = await asyncio.to_thread(_resolve, resolver, chat.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in chat.messages]
        try:
            prompt_tokens = int(lm.encode([messages])["attention_mask"].sum())
        except SafeSteerError as exc:  # e.g. a reserved marker typed into a message
            raise ApiError(400, str(exc), "invalid_request_error", "invalid_message", "messages") from exc
        if prompt_tokens > max_prompt_tokens():
            raise ApiError(
                400,
                f"the conversation has {prompt_tokens} tokens (chat template included); the limit is "
                f"{max_prompt_tokens()}",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            )
        max_tokens = chat.max_completion_tokens or chat.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(
                400, f"max_tokens is at most {settings.max_tokens_limit}", "invalid_request_error", None, "max_tokens"
            )
        version = resolved.version
        categories = list(version.categories) if version is not None else []
        job = Job(
            messages,
            [c.steering_spec() for c in categories],
            [c.name for c in categories],
            max_tokens,
            chat.stops(),
            chat.sampling(),
        )
        assert batcher is not None
        try:
            batcher.submit(job)
        except QueueFull as exc:
            raise ApiError(429, str(exc), "rate_limit_error", "queue_full", headers={"Retry-After": "1"}) from exc
        except SafeSteerError as exc:
            raise ApiError(503, str(exc), "server_error", "shutting_down") from exc
        answer_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = {"X-SafeSteer-Version": resolved.name}
        if chat.stream:
            return StreamingResponse(
                _stream(job, answer_id, resolved, settings, store, caller, messages),
                media_type="text/event-stream",
                headers=headers,
            )
        completion = await _wait(job, request, settings.timeout_s)
        await asyncio.to_thread(_audit, store, settings, caller, resolved, completion, messages)
        body = {
            "id": answer_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": resolved.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": _usage(completion),
            "safesteer": _extra(resolved, completion),
        }
        return JSONResponse(body, headers={**headers, "X-SafeSteer-Fired": ",".join(completion.fired)})

    return app


async def _body(request: Request, settings: ServeSettings) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise ApiError(413, f"the request is larger than {settings.max_body_bytes} bytes", "invalid_request_error")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > settings.max_body_bytes:
            raise ApiError(413, f"the request is larger than {settings.max_body_bytes} bytes", "invalid_request_error")
    return body


def _parse(body: bytes, settings: ServeSettings) -> ChatRequest:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8 (byte {exc.start})", "invalid_request_error") from exc
    try:
        chat = ChatRequest.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc.msg})", "invalid_request_error") from exc
    except RecursionError as exc:
        raise ApiError(400, "the body's JSON is nested too deeply", "invalid_request_error") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", "invalid_request_error", None, where) from exc
    chat.refuse_what_is_not_implemented()
    for index, message in enumerate(chat.messages):
        if not _encodable(message.text()):
            where = f"messages.{index}.content"
            raise ApiError(400, f"{where}: {_SURROGATE}", "invalid_request_error", None, where)
    if not _encodable(chat.model) or any(not _encodable(s) for s in chat.stops()):
        raise ApiError(400, f"model or stop: {_SURROGATE}", "invalid_request_error")
    if len(chat.messages) > settings.max_messages:
        raise ApiError(400, f"at most {settings.max_messages} messages", "invalid_request_error", None, "messages")
    return chat


_SURROGATE = "holds a lone UTF-16 surrogate (U+D800 to U+DFFF), which is not text"


def _encodable(text: str) -> bool:
    """False for strings holding lone UTF-16 surrogates, which JSON can carry but no tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _wait(job: Job, request: Request, timeout_s: float) -> Completion:
    """The job's completion; a client that leaves, or a time limit passed, cancels the job's generation.

    The batch's future is never handed to `asyncio.wait_for` itself: cancelling it from here would
    race with the worker finishing it. The job is cancelled through its own flag instead.
    """
    deadline = time.monotonic() + timeout_s
    waiting = asyncio.wrap_future(job.result)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(504, "the request took longer than its time limit", "server_error", "timeout")
            done, _ = await asyncio.wait({waiting}, timeout=min(left, 0.25))
            if done:
                return waiting.result()
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the connection", "server_error", "client_closed")
    except BaseException:
        job.cancel()
        raise


def _resolve(resolver: PolicyResolver, model: str) -> Resolved:
    try:
        return resolver.resolve(model)
    except UnknownModel as exc:
        raise ApiError(404, str(exc), "invalid_request_error", "model_not_found", "model") from exc
    except SafeSteerError as exc:  # e.g. a version made for another model
        raise ApiError(400, str(exc), "invalid_request_error", None, "model") from exc


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _extra(resolved: Resolved, completion: Completion) -> dict[str, Any]:
    version = resolved.version
    return {
        "policy": version.policy if version else None,
        "version": version.number if version else None,
        "fired": list(completion.fired),
        "categories": {c.name: c.mode for c in version.categories} if version else {},
    }


def _audit(
    store: Any,
    settings: ServeSettings,
    caller: str,
    resolved: Resolved,
    completion: Completion,
    messages: list[dict[str, str]],
) -> None:
    if not settings.audit or resolved.version is None:
        return
    detail: dict[str, Any] = {"fired": list(completion.fired), "tokens": completion.completion_tokens}
    if settings.audit_prompts:
        detail["messages"] = messages
    try:
        store.record(caller, "serve", resolved.version.policy, resolved.version.number, **detail)
    except Exception:  # an answer is never lost because its audit entry could not be written
        log.warning("could not record a served answer in the audit log", exc_info=True)


def _stream(
    job: Job,
    answer_id: str,
    resolved: Resolved,
    settings: ServeSettings,
    store: Any,
    caller: str,
    messages: list[dict[str, str]],
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {
            "id": answer_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": resolved.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def events() -> Iterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        try:
            for piece in job.stream(timeout=settings.timeout_s):
                yield chunk({"content": piece})
            completion = job.result.result(timeout=settings.timeout_s)
        except Exception as exc:  # the headers are sent: say it in the stream, in OpenAI's error shape
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
            return
        _audit(store, settings, caller, resolved, completion, messages)
        yield chunk({}, completion.finish_reason, usage=_usage(completion), safesteer=_extra(resolved, completion))
        yield "data: [DONE]\n\n"

    async def cancelling() -> AsyncIterator[str]:
        """The events, and the job cancelled as soon as the client stops reading them."""
        try:
            async for event in iterate_in_threadpool(events()):
                yield event
        finally:
            job.cancel()

    return cancelling()
