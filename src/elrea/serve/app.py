"""`elrea serve`: an OpenAI-compatible HTTP server over a fitted run (FastAPI + uvicorn).

    GET  /v1/models               the served model
    POST /v1/completions          raw prompt -> text (stream: server-sent events)
    POST /v1/chat/completions     messages, through the chat template as in training
    GET  /health                  liveness, engine counters and occupancy (no API key needed)

Every request is routed by its own gradient unless its `"elrea"` field gives weights, a router
or top-k; the response's `"elrea"` field reports the weights used. Requests that arrive
together are decoded together (elrea.serve.engine). Omitted sampling fields take the run's
`generation` defaults (greedy unless the run says otherwise), as a server that follows the
model's generation config does. A client that closes its connection before its answer is
complete (streaming or not) has its request cancelled: its batch row stops at the next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import secrets
from contextlib import asynccontextmanager

# at module level: FastAPI reads the endpoints' (string) annotations, `Request` included, from here
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import ConfigError
from .engine import Engine, Job, QueueFull
from .protocol import ChatRequest, CompletionRequest, OpenAIError, new_id, now

log = logging.getLogger(__name__)


def _unicode(value, param: str):
    """`value` (text, or lists and dicts of it) if every string is valid Unicode: JSON may carry
    lone surrogates ("\\ud800") that no tokenizer takes."""
    texts = [value] if isinstance(value, str) else [v for m in value for v in m.values()] \
        if isinstance(value, list) else []
    for t in texts:
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise OpenAIError(f"{param}: not valid Unicode text (a lone surrogate?)", param=param) from None
    return value


MAX_BODY = 4 << 20      # bytes of a request body (4 MiB): far above any prompt a run takes
CHARS_PER_TOKEN = 64    # a prompt longer than max_length x this is over max_length tokens, untokenised


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 (OpenAI's JSON) as soon
    as its Content-Length says so, or as its bytes pass the limit (chunked uploads), before any
    JSON is parsed: one large body cannot hold the event loop, nor the memory, nor /health. A
    body within the limit is read here (at most `limit` bytes held) and handed on whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._drain(receive)
            return await self._refuse(send)
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client went away
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                if message.get("more_body"):
                    await self._drain(receive)
                return await self._refuse(send)
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()   # after the body: disconnects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _drain(self, receive) -> None:
        """Read and drop the rest of the body (up to 64 x the limit), so that the client, which
        sends it all before it reads, gets the 413 rather than a reset connection."""
        seen = 0
        while seen < 64 * self.limit:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return
            seen += len(message.get("body", b""))

    async def _refuse(self, send):
        body = json.dumps(OpenAIError(f"request body over {self.limit} bytes", status=413,
                                      code="request_too_large").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(model, served_name: str, api_key: str | None = None, slots: int = 16, max_length: int = 1024,
               max_queue: int = 256, batching: str = "continuous", max_body: int = MAX_BODY):
    """A FastAPI app serving `model` (an elrea.ELREA) as `served_name`; the scheduler's settings
    as in elrea.serve.engine.Engine; request bodies over `max_body` bytes are refused (413)."""
    model_context = int(getattr(model.model.config, "max_position_embeddings", 0) or 0) or None
    engine = Engine(model, slots=slots, max_length=min(max_length, model_context or max_length),
                    max_queue=max_queue, batching=batching)
    # a request's prompt and new tokens live in one slot's columns
    context = engine.max_length if not model_context else min(engine.max_length, model_context)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        # uvicorn has let in-flight requests finish; the engine drains what is left
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
        encoder.shutdown(wait=False)

    app = FastAPI(title="elrea", lifespan=lifespan)
    app.state.engine = engine

    def error(e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, e: OpenAIError):
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error(OpenAIError("We could not parse the JSON body of your request: "
                                     f"{first.get('msg', 'malformed JSON')}", code="invalid_json"))
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error(OpenAIError(f"{where or 'body'}: {first.get('msg', 'invalid value')}", param=where))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        return error(OpenAIError(str(e.detail), status=e.status_code, type="invalid_request_error"))

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health":  # the API, and its /docs and /openapi.json
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(OpenAIError("Incorrect API key provided.", status=401, code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        """`active`: requests decoding now; `queued`: waiting for the next batch; the rest count
        since start (`cancelled`: requests whose client went away before their answer was complete)."""
        return {"status": "ok", "model": served_name, **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": now(),
                                            "owned_by": "elrea", "adapters": model.adapters}]}

    def job_for(req, enc) -> Job:
        if req.model != served_name:
            raise OpenAIError(f"The model '{req.model}' does not exist; this server serves '{served_name}'",
                              status=404, param="model", code="model_not_found")
        req.check_supported()
        n_prompt, param = len(enc.input_ids), "messages" if isinstance(req, ChatRequest) else "prompt"
        if enc.truncated:  # longer than the run's data.max_length (what routing features see)
            raise OpenAIError(f"The prompt is longer than this run's maximum of {model.formatter.max_length} "
                              "tokens (its data.max_length)", param=param, code="context_length_exceeded")
        if context and n_prompt >= context:
            raise OpenAIError(f"This model's maximum context length is {context} tokens; the prompt has "
                              f"{n_prompt}", param=param, code="context_length_exceeded")
        limit = (context - n_prompt) if context else None
        # chat's max_completion_tokens supersedes max_tokens; without either, the run's default
        given = [m for m in (getattr(req, "max_completion_tokens", None), req.max_tokens) if m is not None]
        max_tokens = given[0] if given else min(model.config.generation.max_new_tokens, limit or 10 ** 9)
        if max_tokens < 1 or (limit and max_tokens > limit):
            raise OpenAIError(f"max_tokens must be in [1, {limit or 'inf'}] for this prompt of {n_prompt} tokens "
                              f"(context {context}), got {max_tokens}", param="max_tokens")
        ext = req.elrea
        weights = ext.weights if ext else None
        if ext:
            try:  # the library's own checks, reported as OpenAI errors on the `elrea` field
                model.check_routing(weights=weights, router=ext.router, tau=ext.routing_tau(), top_k=ext.top_k)
            except ConfigError as e:
                raise OpenAIError(f"elrea.{e}", param=f"elrea.{e.param}") from None
        sampling = {"max_new_tokens": max_tokens}
        if req.temperature is not None:
            sampling["do_sample"] = req.temperature > 0
            if req.temperature > 0:
                sampling["temperature"] = req.temperature
        if req.top_p is not None:
            sampling["top_p"] = req.top_p
        # OpenAI: without a seed every request samples afresh (ELREA's own default seed is fixed)
        seed = req.seed if req.seed is not None else secrets.randbits(62)
        if req.ignore_eos:
            sampling["eos_token_id"] = []
        decoding = model.decoding(seed=seed, **sampling)
        return Job(enc, decoding, emit=None, weights=weights, router=(ext.router if ext and ext.router else
                                                                      model.config.routing.router),
                   tau=ext.routing_tau() if ext else None, top_k=ext.top_k if ext else None, stop=req.stops(),
                   stream=bool(req.stream))

    watchers: set[asyncio.Task] = set()   # asyncio holds only weak references to running tasks

    def cancel_on_disconnect(request: Request, job: Job, events: asyncio.Queue) -> None:
        """Cancel `job` when its client closes the connection, and wake its handler with ("gone", None).

        The request body has been read, so `receive()` only returns once the client has gone or
        the response is complete; in the second case the job has finished and cancelling it does
        nothing."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()
            events.put_nowait(("gone", None))

        task = asyncio.create_task(watch())
        watchers.add(task)
        task.add_done_callback(watchers.discard)

    async def run(job: Job, req, chat: bool, request: Request):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job.emit = lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data))
        try:
            engine.submit(job)
        except QueueFull as e:
            raise OpenAIError(f"The server is overloaded: {e}; retry later", status=503, type="server_error",
                              code="server_overloaded") from None
        cancel_on_disconnect(request, job, events)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        if req.stream:
            return StreamingResponse(_sse(job, events, rid, created, chat, req), media_type="text/event-stream")
        text, weights, done = [], None, None
        while done is None:
            kind, data = await events.get()
            if kind == "start":
                weights = data["weights"]
            elif kind == "text":
                text.append(data)
            elif kind == "done":
                done = data
            elif kind == "gone":   # nobody will read this answer (499: nginx's "client closed request")
                raise OpenAIError("the client closed the connection", status=499, code="client_closed_request")
            else:
                raise OpenAIError(f"generation failed: {data}", status=500, type="server_error")
        usage = {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                 "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}
        choice = {"index": 0, "finish_reason": done["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": served_name, "choices": [choice], "usage": usage,
                "elrea": {"weights": weights, "adapters": model.adapters, "router": job.router if job.weights is None
                          else "fixed"}}

    async def _sse(job, events, rid, created, chat, req):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta=None, finish=None, extra=None):
            choice = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = delta if delta is not None else {}
            else:
                choice["text"] = (delta or {}).get("content", "")
                choice["logprobs"] = None
            body = {"id": rid, "object": obj, "created": created, "model": served_name, "choices": [choice],
                    **(extra or {})}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            while True:
                kind, data = await events.get()
                if kind == "start":
                    ext = {"elrea": {"weights": data["weights"], "adapters": model.adapters}}
                    yield chunk({"role": "assistant", "content": ""} if chat else {"content": ""}, extra=ext)
                elif kind == "text":
                    yield chunk({"content": data})
                elif kind == "done":
                    yield chunk(None, data["finish_reason"])
                    if (req.stream_options or {}).get("include_usage"):  # OpenAI: a last chunk, no choices
                        usage = {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                                 "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}
                        body = {"id": rid, "object": obj, "created": created, "model": served_name, "choices": [],
                                "usage": usage}
                        yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                elif kind == "gone":
                    return
                else:
                    yield f"data: {json.dumps(OpenAIError(data, 500, type='server_error').body())}\n\n"
                    return
        finally:
            job.cancel()  # ended early (the client went away): free the row at the next step

    encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="elrea-tokenize")

    async def encode(prompt, param: str, **kw):
        """The prompt (text, or chat messages) tokenised off the event loop (one thread, in
        arrival order), after the cheap checks: a prompt too long in characters to fit is refused
        before it is tokenised."""
        _unicode(prompt, param)
        chars = len(prompt) if isinstance(prompt, str) else sum(len(str(m.get("content", ""))) for m in prompt)
        if chars > model.formatter.max_length * CHARS_PER_TOKEN:
            raise OpenAIError(f"The prompt is longer than this run's maximum of {model.formatter.max_length} "
                              "tokens (its data.max_length)", param=param, code="context_length_exceeded")
        item = prompt if isinstance(prompt, str) else [prompt]
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(encoder, lambda: model.encode(item, **kw)))[0]

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        enc = await encode(req.text(), "prompt", raw=True)
        return await run(job_for(req, enc), req, chat=False, request=request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        enc = await encode(req.chat(), "messages")
        return await run(job_for(req, enc), req, chat=True, request=request)

    app.add_middleware(BodyLimit, limit=max_body)

    return app


def serve(run: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str | None = None, served_name: str | None = None, slots: int = 16, max_length: int = 1024,
          max_queue: int = 256, batching: str = "continuous", compile: str | None = None,
          max_body: int = MAX_BODY) -> None:
    """Load the run and serve it until SIGINT/SIGTERM (in-flight requests finish first)."""
    import uvicorn

    from ..api import ELREA

    model = ELREA.from_pretrained(run, device=device)
    if compile is not None:
        model.engine.set_compile(compile)
    name = served_name or model.run_dir.resolve().name
    app = create_app(model, name, api_key=api_key, slots=slots, max_length=max_length, max_queue=max_queue,
                     batching=batching, max_body=max_body)
    engine = app.state.engine
    log.info("serving %s as %r on http://%s:%d/v1 (%d adapters; %s batching on %d slots x %d tokens, "
             "KV cache %.0f MiB once allocated; compile: %s)", run, name, host, port, len(model.adapters), batching,
             engine.slots, engine.max_length, engine.cache_mib(), model.engine.compile)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=None)
