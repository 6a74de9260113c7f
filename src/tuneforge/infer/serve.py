"""``tuneforge serve``: an OpenAI-compatible HTTP server for a run or a model (FastAPI + uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, with
``"stream": true`` sent as server-sent events (``data: {...}`` lines, then ``data: [DONE]``).
The request's ``model`` picks what answers: an adapter's name, or the base model's name for the
base with adapters off. Chat prompts go through the run's chat template (``render_prompt``, the
training template); completions take the prompt text as is.

One model, one generation at a time: requests queue for a single worker thread that owns the
model (so an adapter switch can never interleave with another request's generation). A bad
request gets a 4xx JSON error in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``; nothing a client sends can stop the server.

With an API key in force (``--api-key``, ``TUNEFORGE_API_KEY``, or generated when ``--host`` is
not loopback; see ``tuneforge.access``) every request needs ``Authorization: Bearer KEY``;
without it, or with another key, the answer is 401 with code ``invalid_api_key``, as OpenAI's.
"""

from __future__ import annotations

import asyncio
import copy
import json
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tuneforge.access import access_token, bearer_matches, is_loopback
from tuneforge.errors import TuneforgeError
from tuneforge.infer.chat import Finished, Sampling, generate_stream, use_adapter

MAX_QUEUE = 256  # requests waiting for the model before new ones get 503
DEFAULT_CHAT_TOKENS = 256
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """A request the server refuses; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


# -- the worker that owns the model ---------------------------------------------------------------
@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str | None  # None: the base model, adapters off
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("text", str) ... then ("done", Finished) or ("error", str)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    """The loaded model and the single thread that generates with it, one job at a time."""

    def __init__(self, model, tokenizer, base_name: str, adapters: list[str], max_context: int):
        self.model = model
        self.tokenizer = tokenizer  # used by the worker thread only
        # Requests are tokenized on the event loop's thread: a copy, so the two threads never
        # share one Rust tokenizer.
        self.request_tokenizer = copy.deepcopy(tokenizer)
        self.base_name = base_name
        self.adapters = adapters
        self.max_context = max_context
        self.jobs: queue.Queue[Job] = queue.Queue(maxsize=MAX_QUEUE)
        self.created = int(time.time())
        self.thread = threading.Thread(target=self._work, name="tuneforge-generate", daemon=True)
        self.thread.start()

    def model_names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def adapter_for(self, name: str) -> str | None:
        if name == self.base_name:
            return None
        if name in self.adapters:
            return name
        raise ApiError(
            404,
            f"The model '{name}' does not exist; this server has: {', '.join(self.model_names())}",
            "model",
            "model_not_found",
        )

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(
                503, "the server is busy; retry later", None, "overloaded", "server_error"
            ) from None

    def close(self) -> None:
        """End the worker thread once the queued jobs are done, so the model can be freed (the
        web UI loads another run's model in place of this one)."""
        self.jobs.put(None)  # type: ignore[arg-type]

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                self.model = self.tokenizer = None
                return
            if job.cancelled.is_set():
                continue
            try:
                with use_adapter(self.model, job.adapter):
                    done = generate_stream(
                        self.model,
                        self.tokenizer,
                        job.prompt_ids,
                        job.sampling,
                        lambda text, job=job: job.emit("text", text),
                        job.cancelled.is_set,
                    )
                job.emit("done", done)
            except Exception as e:  # a bug must not kill the worker; the request gets a 500
                job.emit("error", f"{type(e).__name__}: {e}")


# -- request parsing ------------------------------------------------------------------------------
def _model_max_context(model) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 4096)


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return value
    raise ApiError(400, "'stop' must be a string or a list of at most 4 strings", "stop")


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"'{key}' must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _sampling(body: dict, default_tokens: int, prompt_len: int, max_context: int) -> Sampling:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    tokens = body.get(key)
    if tokens is None:
        tokens = min(default_tokens, max(1, max_context - prompt_len))
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ApiError(400, f"'{key}' must be a positive integer, got {tokens!r}", key)
    if prompt_len + tokens > max_context:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_context} tokens; the prompt has "
            f"{prompt_len} and {key} asks for {tokens}",
            key,
            "context_length_exceeded",
        )
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"'seed' must be an integer, got {seed!r}", "seed")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise ApiError(400, "'top_p' must be in (0, 1]", "top_p")
    return Sampling(
        max_new_tokens=tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=top_p,
        stop=_stop_list(body.get("stop")),
        seed=seed,
    )


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ApiError(400, f"{where}: only text content parts are supported", "messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise ApiError(400, f"{where}: 'content' must be a string", "messages")


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(
                400, f"{where}: 'role' must be one of {', '.join(ROLES)}", f"messages[{i}].role"
            )
        out.append({"role": ROLES[m["role"]], "content": _content(m.get("content"), where)})
    return out


# -- the app ------------------------------------------------------------------------------------------
def _chunk_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _usage(done: Finished) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
    }


class RequireKey:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <key>``, else 401
    in OpenAI's shape. Plain ASGI (not ``BaseHTTPMiddleware``), so streaming and a client's
    disconnect pass through untouched."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization")
            if not bearer_matches(header.decode("latin-1") if header else None, self.key):
                message = (
                    "Incorrect API key provided."
                    if header
                    else "You didn't provide an API key: send it as 'Authorization: Bearer KEY'."
                )
                error = ApiError(401, message, code="invalid_api_key")
                response = JSONResponse(
                    error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, api_key: str | None = None):
    """The FastAPI app serving ``engine``; with ``api_key``, every request must send it as
    ``Authorization: Bearer <api_key>`` (see ``tuneforge.access``)."""
    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind=kind).body(), e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        return JSONResponse(ApiError(400, first.get("msg", "invalid request")).body(), 400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        body = ApiError(500, f"internal error: {type(e).__name__}", kind="server_error").body()
        return JSONResponse(body, 500)

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise ApiError(400, "'model' is required (see GET /v1/models)", "model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", "stream")
        return body

    @app.get("/v1/models")
    async def models():
        data = [
            {"id": name, "object": "model", "created": engine.created, "owned_by": "tuneforge"}
            for name in engine.model_names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        adapter = engine.adapter_for(body["model"])
        from tuneforge.data.render import render_prompt

        try:
            prompt = render_prompt(engine.request_tokenizer, chat_messages(body))
        except TuneforgeError as e:
            raise ApiError(400, str(e), "messages") from None
        except Exception as e:  # the chat template rejected the conversation
            raise ApiError(
                400, f"the chat template rejected the messages: {e}", "messages"
            ) from None
        sampling = _sampling(body, DEFAULT_CHAT_TOKENS, len(prompt), engine.max_context)
        return await respond(request, body, prompt, adapter, sampling, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        adapter = engine.adapter_for(body["model"])
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", "prompt")
        ids = engine.request_tokenizer(prompt)["input_ids"]
        sampling = _sampling(body, DEFAULT_COMPLETION_TOKENS, len(ids), engine.max_context)
        return await respond(request, body, ids, adapter, sampling, chat=False)

    async def respond(request, body, prompt_ids, adapter, sampling, chat: bool):
        loop = asyncio.get_running_loop()
        job = Job(prompt_ids, adapter, sampling, loop, asyncio.Queue())
        engine.submit(job)
        rid = _chunk_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        name = body["model"]
        if not body.get("stream", False):
            text: list[str] = []
            try:
                while True:
                    kind, value = await job.events.get()
                    if kind == "text":
                        text.append(value)
                    elif kind == "error":
                        raise ApiError(500, f"generation failed: {value}", kind="server_error")
                    else:
                        break
            finally:
                job.cancelled.set()  # a client that went away stops its generation
            done: Finished = value
            reason = "stop" if done.finish_reason == "cancelled" else done.finish_reason
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "finish_reason": reason,
                }
                kind_name = "chat.completion"
            else:
                choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": reason}
                kind_name = "text_completion"
            return {
                "id": rid,
                "object": kind_name,
                "created": created,
                "model": name,
                "choices": [choice],
                "usage": _usage(done),
            }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(choice: dict | None, usage: dict | None = None) -> str:
            chunk = {
                "id": rid,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": name,
                "choices": [choice] if choice else [],
            }
            if usage is not None:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        def piece(text: str | None, reason: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                return {"index": 0, "delta": delta, "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

        async def sse():
            try:
                if chat:
                    yield event(piece(None, None, first=True))
                while True:
                    kind, value = await job.events.get()
                    if kind == "text":
                        yield event(piece(value, None))
                    elif kind == "error":
                        err = ApiError(500, f"generation failed: {value}", kind="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
                    else:
                        yield event(piece(None, value.finish_reason))
                        if include_usage:
                            yield event(None, _usage(value))
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled.set()

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


# -- running ------------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), bound before the server starts so a client can
    connect as soon as the address is printed."""
    if not 0 <= port <= 65535:
        raise TuneforgeError(f"--port must be in 0..65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError as e:
        raise TuneforgeError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def serve(
    ref: str,
    adapters: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    threads: int | None = None,
    api_key: str | None = None,
    key_source: str = "--api-key",
) -> None:
    """Load ``ref`` (+ ``adapters``) and serve it until interrupted.

    ``api_key``: the key every request must send (``key_source`` names where it came from, for
    errors); None: none on loopback, a generated one (printed once) on any other ``host``.

    Raises:
        TuneforgeError: bad references, adapters or key, an address that cannot be bound.
    """
    import uvicorn

    from tuneforge.infer.runs import load_with_adapters

    key = access_token(host, api_key, key_source)

    if threads is not None:
        if threads < 1:
            raise TuneforgeError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    sock = bind(host, port)  # fail on a taken port before the slow model load
    model, tokenizer, base_name, names, _ = load_with_adapters(ref, adapters, device)
    engine = Engine(model, tokenizer, base_name, names, _model_max_context(model))
    app = create_app(engine, key)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if not is_loopback(host):
        print(
            f"warning: listening on {host}, reachable from other machines; every request needs "
            "the API key, sent over plain HTTP (use TLS or an SSH tunnel off a trusted network)",
            file=sys.stderr,
        )
    if key is not None and api_key is None:
        print(f"api key (send as Authorization: Bearer KEY): {key}", flush=True)
    print(
        f"serving {', '.join(engine.model_names())} on http://{shown}:{bound_port}/v1",
        flush=True,
    )
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
