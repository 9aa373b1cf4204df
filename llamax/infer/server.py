"""An OpenAI-compatible HTTP server over the batching `Engine` (FastAPI; run it with uvicorn).

    app = create_app(engine, chat_format, model_name="my-model", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health, and the chat
page at /. Each choice of each request is one engine request; the engine thread decodes them
with everyone else's. Events cross from the engine thread to the event loop with
`call_soon_threadsafe`, so no request holds a thread while it waits. A client that disconnects
cancels its requests, which frees their slots before the next decode step.

Errors are OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`): 400 for bad
input (see `llamax.infer.openai_api`), 401 for a missing or wrong key when `api_key` is set
(every endpoint but /health and the page itself), 404 for an unknown model or route.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import random
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamax.errors import LlamaxError
from llamax.infer import openai_api as api
from llamax.infer.chat_format import ChatFormat
from llamax.infer.engine import Engine, SamplingParams, TokenEvent
from llamax.infer.text_stream import TextStream

MAX_BODY_BYTES = 8 << 20
PUBLIC_PATHS = {"/health", "/", "/favicon.ico"}


class Choice:
    """One choice of a response: its engine request, text stream and what it produced so far."""

    def __init__(self, index: int, prompt_ids: list[int], text: TextStream, echo: str = ""):
        self.index, self.prompt_ids, self.text = index, prompt_ids, text
        self.engine_request: Any = None
        self.content = echo  # the completion text so far (the prompt first when echoing)
        self.echo_length = len(echo)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[tuple[tuple[int, float], ...]] = []
        self.finish_reason: str | None = None
        self.error: str | None = None

    def consume(self, event: TokenEvent) -> str | None:
        """Applies an engine event; returns the new text (None once the choice has finished)."""
        if self.finish_reason:
            return None  # tokens decoded after a stop string matched, then 'cancelled'
        delta = ""
        if event.token is not None:
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.top.append(event.top_logprobs)
            delta = self.text.push(event.token)
            if self.text.stopped:  # a stop string: end here and free the slot
                self.engine_request.cancel()
                self.finish_reason = "stop"
        if event.finish_reason and not self.finish_reason:
            delta += self.text.finish()
            self.finish_reason = event.finish_reason
            self.error = event.error
        self.content += delta
        return delta


def _json_error(error: api.ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class BearerAuth:
    """ASGI middleware: 401 unless `Authorization: Bearer <api_key>` (public paths excepted).

    Plain ASGI rather than `@app.middleware`: that wrapper buffers streamed responses through
    its own task, which hides a client's disconnect from the stream."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.api_key):
                response = _json_error(api.ApiError(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                    code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, chat: ChatFormat, model_name: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) as `model_name`."""
    app = FastAPI(title="llamax", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("llamax.infer").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, error: api.ApiError):
        return _json_error(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return _json_error(api.ApiError(error.status_code, f"{request.method} {request.url.path}: "
                                        f"{error.detail}", code=code))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, error: Exception):
        return _json_error(api.ApiError(500, f"internal error: {type(error).__name__}: {error}",
                                        kind="server_error"))

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": engine.num_active,
                "waiting": engine.num_waiting, "max_batch": engine.max_batch}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llamax", "max_model_len": engine.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_json(request)
        parsed = api.parse_completion(body)
        _check_model(body, model_name)
        choices = []
        for prompt_index, prompt in enumerate(parsed.prompts):
            ids = chat.completion_ids(prompt) if isinstance(prompt, str) else list(prompt)
            echo = (prompt if isinstance(prompt, str) else chat.decode(ids)) if parsed.echo else ""
            for _ in range(parsed.n):
                text = TextStream(chat, ids, parsed.stop, chat.stop_ids)
                choices.append(Choice(len(choices), ids, text, echo))
        return await _respond(request, parsed, choices, "text_completion", "cmpl", prompt_param="prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_json(request)
        parsed = api.parse_chat(body)
        _check_model(body, model_name)
        try:
            ids = chat.prompt_ids(parsed.prompts[0])
        except LlamaxError as exc:
            raise api.ApiError(400, str(exc), param="messages", code="invalid_value") from exc
        stop = tuple(dict.fromkeys(parsed.stop + chat.stop_strings))
        choices = [Choice(i, ids, TextStream(chat, ids, stop, chat.stop_ids, strip_leading=True))
                   for i in range(parsed.n)]
        return await _respond(request, parsed, choices, "chat.completion", "chatcmpl", prompt_param="messages")

    async def _respond(request: Request, parsed: api.GenerationRequest, choices: list[Choice],
                       kind: str, id_prefix: str, prompt_param: str):
        events = _submit_all(parsed, choices, prompt_param)
        response_id = api.new_id(id_prefix)
        prompt_tokens = sum(len(c.prompt_ids) for c in choices[::parsed.n])
        if parsed.stream:
            stream = _stream(request, parsed, choices, events, kind, response_id, prompt_tokens)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while not all(c.finish_reason for c in choices):
                try:
                    index, event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                choices[index].consume(event)
        finally:
            _cancel(choices)
        failed = next((c for c in choices if c.finish_reason in ("error", "cancelled")), None)
        if failed is not None:
            raise api.ApiError(500, f"generation failed: {failed.error or 'the engine stopped'}",
                               kind="server_error")
        body = [_choice_body(c, kind, parsed, chat) for c in choices]
        return api.envelope(kind, response_id, model_name, body,
                            api.usage(prompt_tokens, sum(len(c.tokens) for c in choices)))

    def _submit_all(parsed: api.GenerationRequest, choices: list[Choice], prompt_param: str) -> asyncio.Queue:
        """Checks every choice, then queues them all on the engine (none if any is refused)."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        base_seed = random.getrandbits(32) if parsed.seed is None else parsed.seed
        plans = []
        for choice in choices:
            room = engine.max_seq_len - len(choice.prompt_ids)
            max_tokens = parsed.max_tokens if parsed.max_tokens is not None else room
            if room < 1 or max_tokens > room:
                asked = "" if parsed.max_tokens is None else f" + max_tokens {max_tokens}"
                raise api.ApiError(
                    400, f"this model's context is {engine.max_seq_len} tokens; the request has "
                    f"{len(choice.prompt_ids)} prompt tokens{asked}. Shorten the {prompt_param}"
                    + (f" or ask for at most {room} tokens" if room >= 1 else ""),
                    param=prompt_param if room < 1 else "max_tokens", code="context_length_exceeded")
            sampling = SamplingParams(
                max_tokens=max_tokens, temperature=parsed.temperature, top_p=parsed.top_p,
                top_k=parsed.top_k, seed=(base_seed + choice.index) % (1 << 32),
                stop_ids=chat.stop_ids, logprobs=parsed.logprobs)
            try:
                engine.check(choice.prompt_ids, sampling)
            except LlamaxError as exc:
                raise api.ApiError(400, str(exc), code="invalid_value") from exc
            plans.append((choice, sampling))
        for choice, sampling in plans:
            sink = (lambda event, i=choice.index: loop.call_soon_threadsafe(events.put_nowait, (i, event)))
            choice.engine_request = engine.submit(choice.prompt_ids, sampling, sink=sink)
        return events

    async def _stream(request: Request, parsed: api.GenerationRequest, choices: list[Choice],
                      events: asyncio.Queue, kind: str, response_id: str,
                      prompt_tokens: int) -> AsyncIterator[str]:
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else kind

        def chunk(choice_body: list, usage: dict | None = None) -> str:
            return f"data: {json.dumps(api.envelope(chunk_kind, response_id, model_name, choice_body, usage))}\n\n"

        try:
            if kind == "chat.completion":
                for c in choices:
                    yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
            elif parsed.echo:
                for c in choices:
                    yield chunk([{"index": c.index, "text": c.content, "logprobs": None, "finish_reason": None}])
            while not all(c.finish_reason for c in choices):
                index, event = await events.get()
                choice = choices[index]
                seen = len(choice.tokens)
                delta = choice.consume(event)
                if delta is None:
                    continue
                if choice.error or choice.finish_reason == "cancelled":
                    error = api.ApiError(500, f"generation failed: {choice.error or 'the engine stopped'}",
                                         kind="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                new_tokens = slice(seen, len(choice.tokens))
                if delta or (parsed.logprobs is not None and new_tokens.start < new_tokens.stop) \
                        or choice.finish_reason:
                    last = all(c.finish_reason for c in choices)
                    usage = None
                    if last and not parsed.include_usage:  # usage in every response
                        usage = api.usage(prompt_tokens, sum(len(c.tokens) for c in choices))
                    yield chunk([_delta_body(choice, kind, delta, parsed, chat, new_tokens)], usage)
            if parsed.include_usage:
                yield chunk([], api.usage(prompt_tokens, sum(len(c.tokens) for c in choices)))
            yield "data: [DONE]\n\n"
        finally:  # normal end, error, or the client went away (the task is cancelled)
            _cancel(choices)

    return app


def _cancel(choices: list[Choice]) -> None:
    for choice in choices:
        if choice.engine_request is not None:
            choice.engine_request.cancel()


async def _read_json(request: Request) -> Any:
    """The request body as JSON (cached on the request), or ApiError 400/413."""
    if not hasattr(request.state, "json_body"):
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:  # refuse before reading it
            raise api.ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="payload_too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise api.ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="payload_too_large")
        try:
            request.state.json_body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise api.ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    return request.state.json_body


def _check_model(body: Any, model_name: str) -> None:
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != model_name:
        raise api.ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")


def _logprob_parts(choice: Choice, chat: ChatFormat, tokens: slice):
    strings = [chat.token_text(t) for t in choice.tokens[tokens]]
    top = [[(chat.token_text(i), p) for i, p in alternatives] for alternatives in choice.top[tokens]]
    return strings, choice.logprobs[tokens], top


def _choice_body(choice: Choice, kind: str, parsed: api.GenerationRequest, chat: ChatFormat) -> dict:
    finish = "stop" if choice.finish_reason == "stop" else "length"
    logprobs = None
    if parsed.logprobs is not None:
        strings, values, top = _logprob_parts(choice, chat, slice(None))
        logprobs = (api.chat_logprobs(strings, values, top) if kind == "chat.completion" else
                    api.completion_logprobs(strings, values, [dict(t) for t in top],
                                            [choice.echo_length + o for o in choice.text.token_offsets]))
    if kind == "chat.completion":
        return {"index": choice.index, "message": {"role": "assistant", "content": choice.content},
                "logprobs": logprobs, "finish_reason": finish}
    return {"index": choice.index, "text": choice.content, "logprobs": logprobs, "finish_reason": finish}


def _delta_body(choice: Choice, kind: str, delta: str, parsed: api.GenerationRequest,
                chat: ChatFormat, tokens: slice) -> dict:
    finish = None if not choice.finish_reason else ("stop" if choice.finish_reason == "stop" else "length")
    logprobs = None
    if parsed.logprobs is not None:
        strings, values, top = _logprob_parts(choice, chat, tokens)
        offsets = choice.text.token_offsets[tokens]
        logprobs = (api.chat_logprobs(strings, values, top) if kind == "chat.completion" else
                    api.completion_logprobs(strings, values, [dict(t) for t in top],
                                            [choice.echo_length + o for o in offsets]))
    if kind == "chat.completion":
        return {"index": choice.index, "delta": {"content": delta} if delta else {},
                "logprobs": logprobs, "finish_reason": finish}
    return {"index": choice.index, "text": delta, "logprobs": logprobs, "finish_reason": finish}
