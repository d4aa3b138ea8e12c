"""The HTTP API: OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` (the delta is the ``model``; streaming
with server-sent events), ``/v1/models``, ``/health`` and ``/metrics`` (Prometheus text), on FastAPI.  A
sequence-classification backbone serves ``/v1/classify`` instead of the completions::

    POST /v1/classify {"model": "spam", "input": "text" | ["text", ...]}
    -> {"object": "list", "model": "spam", "data": [{"object": "classification", "index": 0, "label": "spam",
        "score": 0.97, "scores": {"ham": 0.03, "spam": 0.97}}, ...], "usage": {"prompt_tokens": 12, ...}}

Bad requests get a 4xx answer in OpenAI's error format and the server keeps serving: malformed JSON or a wrong
field (400), a missing or wrong API key (401), an unknown model (404), a body over the size limit (413), a full
queue (429); a request that takes longer than the timeout gets 504.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine import Classification, Engine, QueueFull, Request
from .text import Text, cut_at_stop


# OpenAI request fields this server does not implement, with the values that ask for nothing (absent is None):
# any other value is refused, since ignoring it would answer another request than the one asked.
# (Compared with their types: completions' logprobs=0 asks for the chosen tokens' log-probabilities.)
UNSUPPORTED = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "seed": (),
    "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "function_call": ("none",),
}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be between {low} and {high}, got {value}", param=name)
    return value


def create_app(engine: Engine, *, base_name: str = "base", api_key: str | None = None, max_prompt_tokens: int = 2048,
               max_new_tokens: int = 512, max_body_bytes: int = 1 << 20, timeout: float = 120.0,
               max_inputs: int = 64) -> FastAPI:
    """The FastAPI application serving ``engine``; ``base_name`` names the bare backbone as a model."""
    statuses: Counter[int] = Counter()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.close)  # finish what is queued

    app = FastAPI(title="deltatune serve", lifespan=lifespan)

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        try:
            if api_key is not None and request.url.path.startswith("/v1/"):
                if request.headers.get("authorization") != f"Bearer {api_key}":
                    raise APIError(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
            length = request.headers.get("content-length", "0")
            if not length.isdigit():
                raise APIError(400, f"Content-Length must be a number of bytes, got {length!r}")
            if int(length) > max_body_bytes:
                raise APIError(413, f"the request body has {length} bytes; this server takes at most {max_body_bytes}")
            response = await call_next(request)
        except APIError as error:
            response = _error(error.status, error.message, error.kind, error.param)
        statuses[response.status_code] += 1
        return response

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, error: APIError) -> JSONResponse:
        return _error(error.status, error.message, error.kind, error.param)

    def models() -> list[str]:
        return [base_name, *engine.registry.names]

    async def body_of(request: HTTPRequest) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"the request body has {len(raw)} bytes; this server takes at most {max_body_bytes}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"the request body is not valid JSON ({error})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model not in models():
            raise APIError(404, f"the model {model!r} does not exist; served: {', '.join(models())}",
                           "not_found_error", "model")
        for unsupported, neutral in UNSUPPORTED.items():
            value = body.get(unsupported)
            if value is not None and not any(type(value) is type(n) and value == n for n in neutral):
                raise APIError(400, f"{unsupported}={body[unsupported]!r} is not supported by this server",
                               param=unsupported)
        return body

    def request_of(body: dict, prompt: list[int]) -> Request:
        if len(prompt) > max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server takes at most {max_prompt_tokens}",
                           param="prompt")
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, f"stop must be a non-empty string or a list of up to 4 of them, got {body['stop']!r}",
                           param="stop")
        return Request(prompt=prompt, delta=None if body["model"] == base_name else body["model"], stop=tuple(stop),
                       max_tokens=int(_number({"max_tokens": limit}, "max_tokens", 16, 1, max_new_tokens, True)),
                       temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                       top_p=float(_number(body, "top_p", 1.0, 1e-6, 1.0)))

    def serving(task: str) -> None:
        if engine.task != task:
            doing = "classifies text (/v1/classify)" if engine.task == "classify" else (
                "generates text (/v1/completions, /v1/chat/completions)")
            raise APIError(400, f"this server's backbone ({type(engine.model).__name__}) {doing}; serve a "
                                f"{'sequence-classification' if task == 'classify' else 'causal LM'} backbone for this "
                                "endpoint (deltatune serve --task)")

    async def run(request: Request, body: dict, chat: bool) -> Any:
        serving("generate")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request.on_token = lambda token: loop.call_soon_threadsafe(events.put_nowait, ("token", token))
        request.on_done = lambda tokens, reason, error: loop.call_soon_threadsafe(
            events.put_nowait, ("done", tokens, reason, error))
        try:
            engine.submit(request)
        except QueueFull as error:
            raise APIError(429, str(error), "rate_limit_error") from None
        except KeyError as error:
            raise APIError(404, str(error.args[0]), "not_found_error", "model") from None
        except ValueError as error:  # a delta this engine cannot serve
            raise APIError(400, str(error), param="model") from None
        ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        text = Text(engine.tokenizer, request.stop)

        def usage(tokens: list[int]) -> dict:
            return {"prompt_tokens": len(request.prompt), "completion_tokens": len(tokens),
                    "total_tokens": len(request.prompt) + len(tokens)}

        def choice(piece: str | None, reason: str | None, stream: bool) -> dict:
            if not chat:
                return {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
            content = {"role": "assistant", "content": piece} if not stream else (
                {"content": piece} if piece is not None else {})
            return {"index": 0, "delta" if stream else "message": content, "finish_reason": reason,
                    **({} if stream else {"logprobs": None})}

        async def next_event(deadline: float) -> tuple:
            try:
                return await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise APIError(504, f"the request took longer than {timeout} s", "timeout_error") from None

        deadline = time.monotonic() + timeout
        if not body.get("stream"):
            while (event := await next_event(deadline))[0] != "done":
                pass
            _, tokens, reason, error = event
            if error is not None:
                raise APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error")
            answer, _ = cut_at_stop(engine.tokenizer.decode(tokens, skip_special_tokens=True), request.stop)
            return JSONResponse({"id": ident, "object": kind, "created": created, "model": body["model"],
                                 "choices": [choice(answer, reason, False)], "usage": usage(tokens)})

        async def chunks():
            chunk = {"id": ident, "object": f"{kind}.chunk" if chat else kind, "created": created,
                     "model": body["model"]}
            if chat:
                yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'role': 'assistant'}, 'finish_reason': None}]})}\n\n"
            while True:
                try:
                    event = await next_event(deadline)
                except APIError as error:
                    yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}})}\n\n"
                    return
                if event[0] == "token":
                    piece = text.add(event[1])
                    if piece:
                        yield f"data: {json.dumps({**chunk, 'choices': [choice(piece, None, True)]})}\n\n"
                    continue
                _, tokens, reason, error = event
                if error is not None:
                    yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
                    return
                rest = text.add(None)  # what was held back as the possible start of a stop string
                if rest:
                    yield f"data: {json.dumps({**chunk, 'choices': [choice(rest, None, True)]})}\n\n"
                yield f"data: {json.dumps({**chunk, 'choices': [choice(None, reason, True)], 'usage': usage(tokens)})}\n\n"
                yield "data: [DONE]\n\n"
                return

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await body_of(http)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt")
        return await run(request_of(body, engine.tokenizer(prompt)["input_ids"]), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        body = await body_of(http)
        messages = body.get("messages")
        if (not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise APIError(400, "messages must be a non-empty list of {role, content} objects with string content",
                           param="messages")
        if engine.tokenizer.chat_template is None:
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        prompt = engine.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                      add_generation_prompt=True, tokenize=True, return_dict=True)
        return await run(request_of(body, list(prompt["input_ids"])), body, chat=True)

    @app.post("/v1/classify")
    async def classify(http: HTTPRequest):
        serving("classify")
        body = await body_of(http)
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise APIError(400, "input must be a non-empty string or a non-empty list of them", param="input")
        if len(texts) > max_inputs:
            raise APIError(400, f"input has {len(texts)} texts; this server takes at most {max_inputs} per request",
                           param="input")
        if body["model"] == base_name:
            raise APIError(400, f"{base_name!r} is the bare backbone, whose head was never trained; name a delta",
                           param="model")
        encoded = [engine.tokenizer(text)["input_ids"] for text in texts]
        longest = max(map(len, encoded))
        if longest > max_prompt_tokens:
            raise APIError(400, f"an input has {longest} tokens; this server takes at most {max_prompt_tokens}",
                           param="input")
        loop = asyncio.get_running_loop()
        answers = [loop.create_future() for _ in encoded]
        for tokens, answer in zip(encoded, answers):
            def done(probabilities, reason, error, answer=answer):
                loop.call_soon_threadsafe(answer.set_result, (probabilities, error))
            try:
                engine.submit(Classification(tokens, body["model"], done))
            except QueueFull as error:
                raise APIError(429, str(error), "rate_limit_error") from None
        try:
            results = await asyncio.wait_for(asyncio.gather(*answers), timeout)
        except asyncio.TimeoutError:
            raise APIError(504, f"the request took longer than {timeout} s", "timeout_error") from None
        labels = engine.registry.labels(body["model"])
        data = []
        for index, (probabilities, error) in enumerate(results):
            if error is not None:
                raise APIError(500, f"classification failed: {type(error).__name__}: {error}", "server_error")
            best = max(range(len(labels)), key=probabilities.__getitem__)
            data.append({"object": "classification", "index": index, "label": labels[best],
                         "score": probabilities[best], "scores": dict(zip(labels, probabilities))})
        tokens = sum(map(len, encoded))
        return {"object": "list", "model": body["model"], "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "deltatune"}
                                           for name in models()]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queued(), "deltas": len(engine.registry.names)}

    @app.get("/metrics")
    async def metrics():
        stats, registry = engine.stats, engine.registry
        lines = ["# TYPE deltatune_http_responses_total counter",
                 *(f'deltatune_http_responses_total{{code="{code}"}} {n}' for code, n in sorted(statuses.items())),
                 "# TYPE deltatune_requests_total counter", f"deltatune_requests_total {stats['requests']}",
                 "# TYPE deltatune_failed_requests_total counter", f"deltatune_failed_requests_total {stats['failed']}",
                 "# TYPE deltatune_batches_total counter", f"deltatune_batches_total {stats['batches']}",
                 "# TYPE deltatune_generated_tokens_total counter", f"deltatune_generated_tokens_total {stats['tokens']}",
                 "# TYPE deltatune_queue_depth gauge", f"deltatune_queue_depth {engine.queued()}",
                 "# TYPE deltatune_active_rows gauge", f"deltatune_active_rows {engine.active}",
                 "# TYPE deltatune_deltas_loaded gauge", f"deltatune_deltas_loaded {len(registry.loaded)}",
                 "# TYPE deltatune_delta_bytes gauge", f"deltatune_delta_bytes {registry.loaded_bytes()}",
                 "# TYPE deltatune_evictions_total counter", f"deltatune_evictions_total {registry.evictions}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
