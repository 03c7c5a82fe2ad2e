"""An OpenAI-compatible chat API for the course's model, served on this machine only (lesson 11).

Most LLM applications talk to a model through one HTTP interface: OpenAI's *chat completions*
(`POST /v1/chat/completions`). Hosted providers and local servers (vLLM, llama.cpp, Ollama, TGI)
all speak it, so the same client code works against any of them by changing `base_url`.
This module is a small, readable server that follows that schema for SmolLM2:

* `create_app(model, tokenizer)` -> a FastAPI app with `GET /health`, `GET /v1/models`,
  `GET /v1/models/{id}` and `POST /v1/chat/completions` (plain JSON, or Server-Sent Events when
  `"stream": true`, ending with `data: [DONE]`).
* `stream_text(...)`: the generation behind plain and streamed answers: lesson 06's decoding loop
  (`utils.sampling.stream_tokens`), turned into text pieces that stop at a stop string.
* `start_server()` runs it in a child process bound to 127.0.0.1 and returns a handle whose
  `stop()` ends it (the plumbing lives in `utils.server_process`).
* What a request may contain (strict schema, limits, value checks) lives in `utils.chat_request`.
* Tool calling and structured output (lesson 16): `tools` / `tool_choice` and `response_format`
  {"type": "json_schema"} are decoded under a grammar (utils.tool_serving: utils.tool_calls and
  utils.json_schema_grammar), so a call names one of the tools with arguments that validate against
  its schema, and a structured answer validates against its schema. A call comes back as an assistant
  message with `tool_calls` and finish_reason "tool_calls", streamed as OpenAI streams it.

A server is an attack surface, even on loopback: any program on the machine, and any web page
open in its browser, can send it requests. So every request is checked before the model sees it,
and every refusal is a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`:

* 400 unless the Host header names this machine (127.0.0.1, [::1], localhost, any port): a web page
  that re-points its own domain name at 127.0.0.1 ("DNS rebinding") is refused.
* 413 for a body over MAX_BODY_BYTES, checked on Content-Length and on the bytes actually read
  (a chunked body is not read past the limit).
* 400 for wrong types (`"temperature": "0.5"`, `"max_tokens": 1.5`, `"stream": "yes"`: no silent
  conversion) and for values out of range: more than MAX_MESSAGES messages, a message over
  MAX_CONTENT_CHARS characters, more than MAX_STOP_SEQUENCES stop strings or one over
  MAX_STOP_CHARS, `max_tokens` above the context window, a seed outside [0, MAX_SEED], a prompt
  that does not fit (checked first on its size in characters, before tokenising, then in tokens).
  Unknown fields are ignored, as OpenAI's API does for fields it does not use.
* 404 for an unknown model or route.
All of it is checked before a stream starts; if generation fails mid-stream, the stream ends with
an error event `data: {"error": {...}}` and then `data: [DONE]`. A non-streamed generation stops
when its client disconnects, and `/health` answers even while every worker waits for the model.

Run it by hand with `python -m utils.serving --port 8000` and call it with the `openai` client:
`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`. Not covered: authentication
(anyone on this machine can call it), rate limits, TLS: put a real gateway in front for those.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from contextlib import nullcontext
from typing import Iterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from utils.chat_request import (  # noqa: F401  (the limits: re-exported, documented above)
    MAX_BODY_BYTES,
    MAX_CONTENT_CHARS,
    MAX_MESSAGES,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    MAX_TEMPERATURE,
    ROLES,
    APIError,
    ChatCompletionRequest,
    error_body,
    param_name,
    validate_request,
)
from utils.checks import check_choice
from utils.sampling import max_positions, stream_tokens
from utils.server_process import (  # noqa: F401  (start_server, ChatServer, stop_all_servers: re-exported)
    INSTANCE_ENV,
    ChatServer,
    check_loopback,
    exit_when_parent_dies,
    is_loopback_host_header,
    serve_in_thread,
    start_server,
    stop_all_servers,
)
from utils.tool_calls import render_messages, reply_message
from utils.tool_serving import (  # noqa: F401  (constrained_tokens: re-exported, lesson 11 shows it)
    GrammarCache,
    PrefixCache,
    constrained_tokens,
    reply_stops,
    tool_deltas,
)

MODEL_ID = "SmolLM2-135M-Instruct"  # the name clients pass as `model`


# ----------------------------------------------------------------------------------------------
# Generation, one token at a time (so that it can be streamed)


def held_back_chars(text: str, stops: list[str]) -> int:
    """How many trailing characters not to send yet: an incomplete UTF-8 character, or the start of a
    stop sequence that the next tokens might complete. Example: ("Hello wor", ["world"]) -> 3."""
    if text.endswith("\ufffd"):
        return 1
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


def stream_text(model, tokenizer, input_ids, max_tokens, temperature=0.0, top_p=None, stop=(),
                seed=None, step_lock=None, grammar=None, engine=None,
                prefix_cache=None) -> Iterator[tuple[str, str | None, int]]:
    """Yield (text piece, finish_reason or None, completion tokens so far) once per decoding step.

    The tokens come from lesson 06's KV-cached decoding loop, `stream_tokens` (batch of one, (1, T)
    prompt). A piece is "" while its text is held back (it may be the start of a stop string).
    finish_reason is "stop" (end-of-sequence token or a stop string, which is never sent) or
    "length" (max_tokens). step_lock: held around each step, so that concurrent requests take turns
    on the CPU. grammar: decode under it (`constrained_tokens`; lesson 16). engine: a started
    utils.continuous_batching.ContinuousBatcher that decodes this request in its shared batch instead
    (lesson 17; not combined with a grammar). prefix_cache: a utils.tool_serving.PrefixCache that
    grammar-decoded requests start from (lesson 16). Shown in lesson 11.
    """
    stops = [s for s in stop if s]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | set(eos if isinstance(eos, (list, tuple)) else [eos])
    eos = {int(t) for t in eos if t is not None}
    if grammar is not None:  # constrained decoding (lesson 16): only tokens the grammar allows
        steps = constrained_tokens(model, input_ids, max_tokens, temperature, top_p, eos, generator, grammar,
                                   prefix_cache)
    elif engine is not None:  # continuous batching (lesson 17): the engine's thread runs the steps
        steps = engine.stream(input_ids[0].tolist(), max_tokens, temperature, top_p, generator)
    else:
        steps = stream_tokens(model, input_ids, max_tokens, temperature, top_p=top_p,
                              eos_token_id=eos or None, generator=generator)
    lock = step_lock or nullcontext()
    tokens: list[int] = []
    sent = 0  # characters of the decoded text already sent
    while True:
        with lock:  # one forward pass; the next step may run on another thread (FastAPI's pool)
            next_ids = next(steps, None)  # (1,), or None once max_tokens are done
        if next_ids is None or int(next_ids[0]) in eos:
            break
        tokens.append(int(next_ids[0]))
        text = tokenizer.decode(tokens, skip_special_tokens=True)  # decode all: merges byte pieces
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:  # a stop string: send what precedes it, and finish
            yield text[sent:cut], "stop", len(tokens)
            return
        safe = max(sent, len(text) - held_back_chars(text, stops))
        yield text[sent:safe], None, len(tokens)  # one yield per step, so the caller can stop us
        sent = safe
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    yield text[sent:], ("length" if len(tokens) == max_tokens else "stop"), len(tokens)


# ----------------------------------------------------------------------------------------------
# The app


class LoopbackHostOnly:
    """ASGI middleware: refuse a request whose Host header does not name this machine.

    A browser sends the Host of the page's URL. A hostile page whose domain name is re-pointed at
    127.0.0.1 (DNS rebinding) reaches this server with its own name as Host, and is refused here.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        hosts = [value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"host"]
        host = hosts[0] if len(hosts) == 1 else ""  # none, or more than one: refused
        # Starlette's in-process TestClient (Host "testserver") has no network: nothing to rebind
        in_process = host == "testserver" and (scope.get("client") or ("",))[0] == "testclient"
        if scope["type"] == "http" and not (is_loopback_host_header(host) or in_process):
            body = error_body(f"Invalid Host header {host[:100]!r}: this server answers only requests "
                              "addressed to 127.0.0.1, [::1] or localhost.", param="Host", code="invalid_host")
            return await JSONResponse(body, status_code=400)(scope, receive, send)
        await self.app(scope, receive, send)


TOO_LARGE = error_body(f"The request body is larger than this server's limit of {MAX_BODY_BYTES} bytes.",
                       code="request_too_large")
CLOSE = {"Connection": "close"}  # the rest of a refused body is never read: end the connection


class BodySizeLimit:
    """ASGI middleware: 413 for a body over MAX_BODY_BYTES, said by its Content-Length or seen while
    reading it. A chunked body has no length up front: reading stops at the limit, not at its end."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:  # refused before reading a byte
            return await JSONResponse(TOO_LARGE, status_code=413, headers=CLOSE)(scope, receive, send)
        received = 0

        async def receive_at_most_the_limit():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_BODY_BYTES:  # FastAPI passes an HTTPException on to _http_error
                raise HTTPException(413)
            return message

        await self.app(scope, receive_at_most_the_limit, send)


def create_app(model, tokenizer, model_id: str = MODEL_ID, default_max_tokens: int = 256,
               instance_id: str | None = None, batching: str = "one_at_a_time"):
    """A FastAPI app serving `model` (a transformers causal LM) with OpenAI's chat-completions schema.

    instance_id: echoed by /health, so that start_server can tell its own child from another server.
    app.state.step_lock is the lock each decoding step holds (one model, one forward pass at a time);
    app.state.prefix_cache the PrefixCache of requests decoded under a grammar (tools, response_format).
    batching: "one_at_a_time" (requests take turns, step by step) or "continuous" (lesson 17: one
    batch that requests join and leave at every step, run by app.state.engine in a background thread).
    """
    from utils.continuous_batching import BATCHING_MODES, start_engine

    app_engine = start_engine(model, tokenizer, check_choice("batching", batching, BATCHING_MODES))
    app = FastAPI(title="llm-course chat API", version="1")
    app.add_middleware(BodySizeLimit)
    app.add_middleware(LoopbackHostOnly)  # added last: runs first
    max_context = max_positions(model)
    # The longest token, in characters of its vocabulary entry. In a byte-level BPE (SmolLM2's) an entry
    # has one character per byte of text, so no token covers more text characters than this.
    max_token_chars = max(len(token) for token in tokenizer.get_vocab())
    created = int(time.time())
    app.state.step_lock = step_lock = threading.Lock()
    app.state.engine = app_engine  # None unless batching="continuous"

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _shape_error(request: Request, err: RequestValidationError):  # 400 as OpenAI, not 422
        first = err.errors()[0]
        param, kind = param_name(first.get("loc", ())), first.get("type", "")
        if kind == "json_invalid":
            message, param, code = "We could not parse the JSON body of your request.", None, "json_invalid"
        elif kind == "missing":
            message, code = f"Missing required parameter: '{param}'.", "missing_required_parameter"
        else:
            message = f"Invalid type for '{param}': {first.get('msg')}." if param else \
                f"Invalid body: {first.get('msg')}."
            code = "invalid_type" if kind.endswith("_type") else kind
        return JSONResponse(error_body(message, param=param, code=code), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
        if err.status_code == 413:  # from BodySizeLimit
            return JSONResponse(TOO_LARGE, status_code=413, headers=CLOSE)
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(error_body(message, code=code), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, err: Exception):
        return JSONResponse(error_body(f"The server had an error: {type(err).__name__}",
                                       type="server_error"), status_code=500)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "llm-course"}

    @app.get("/health")
    async def health():  # async: answered on the event loop, never queued behind generations
        return {"status": "ok", "model": model_id, **({"instance_id": instance_id} if instance_id else {})}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        if name != model_id:
            raise APIError(404, f"The model {name[:100]!r} does not exist.", "model", "model_not_found")
        return model_card()

    grammar_cache = GrammarCache(tokenizer)  # an agent sends the same tools every turn: compile once
    app.state.prefix_cache = prefix_cache = PrefixCache()  # ... and the same first few hundred tokens

    def tokenize(settings: dict):
        messages = render_messages(settings["messages"], settings["tools"], settings["answer_schema"])
        input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=True)["input_ids"]
        needed = input_ids.shape[1] + settings["max_tokens"]  # the exact check, now that we have tokens
        if needed > max_context:
            raise APIError(400, f"This model's maximum context length is {max_context} tokens. However, "
                           f"you requested {needed} tokens ({input_ids.shape[1]} in the messages, "
                           f"{settings['max_tokens']} in the completion).", "messages", "context_length_exceeded")
        return input_ids  # (1, T)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        settings = validate_request(req, model_id, max_context, max_token_chars, default_max_tokens)
        input_ids = await run_in_threadpool(tokenize, settings)  # CPU work: off the event loop
        grammar = await run_in_threadpool(grammar_cache.grammar_for, settings)
        prompt_tokens = input_ids.shape[1]
        pieces = stream_text(model, tokenizer, input_ids, settings["max_tokens"], settings["temperature"],
                             settings["top_p"], reply_stops(settings), settings["seed"],
                             step_lock if grammar is not None or app_engine is None else None, grammar,
                             engine=app_engine, prefix_cache=prefix_cache)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        tools = settings["tools"] is not None
        now = int(time.time())

        def usage(n: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        if not settings["stream"]:
            gone = threading.Event()  # set when the client disconnects: generation stops at the next step

            def whole_answer():
                text, finish, n = "", "stop", 0
                for piece, finish_reason, tokens_so_far in pieces:
                    if gone.is_set():
                        return None
                    text, finish, n = text + piece, finish_reason or finish, tokens_so_far
                return text, finish, n

            async def watch_disconnect():
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            watcher = asyncio.ensure_future(watch_disconnect())  # runs while the thread generates
            try:
                answer = await run_in_threadpool(whole_answer)
            finally:
                watcher.cancel()
            if answer is None:  # nobody is listening; this status only shows in logs
                return JSONResponse(error_body("The client disconnected."), status_code=499)
            text, finish, n = answer
            message, is_call = reply_message(text, call_id) if tools else ({"role": "assistant", "content": text}, False)
            return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_id,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": message,
                                 "logprobs": None, "finish_reason": "tool_calls" if is_call else finish}],
                    "usage": usage(n)}

        def chunk(delta: dict, finish_reason=None, choices=True, usage_value=None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": now,
                    "model": model_id, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish_reason}] if choices else []}
            if settings["include_usage"]:
                body["usage"] = usage_value
            return f"data: {json.dumps(body)}\n\n"  # one Server-Sent Event

        def deltas() -> Iterator[tuple[dict, str | None, int]]:
            """(delta, finish_reason, completion tokens so far), one per chunk to send. With tools the
            reply goes through ToolCallStream: content, or a tool call streamed as OpenAI streams it."""
            if not tools:
                yield {"role": "assistant", "content": ""}, None, 0
                for piece, finish_reason, n in pieces:
                    if piece:
                        yield {"content": piece}, None, n
                    if finish_reason:
                        yield {}, finish_reason, n
                return
            yield from tool_deltas(pieces, call_id)

        def events() -> Iterator[str]:  # Starlette runs each step in a worker thread
            n = 0
            try:
                for delta, finish_reason, n in deltas():  # noqa: B007 (n: the count after the loop)
                    yield chunk(delta, finish_reason)
                if settings["include_usage"]:
                    yield chunk({}, choices=False, usage_value=usage(n))
            except Exception as err:  # the 200 status is sent already: report the error in the stream
                error = error_body(f"The server had an error while generating: {type(err).__name__}",
                                   type="server_error")
                yield f"data: {json.dumps(error)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# ----------------------------------------------------------------------------------------------
# Running it: `python -m utils.serving` (start_server() runs this in a child process)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the course's chat model with an OpenAI-style API.")
    parser.add_argument("--host", default="127.0.0.1", help="loopback only (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the course's)")
    parser.add_argument("--batching", choices=("one_at_a_time", "continuous"), default="one_at_a_time")
    args = parser.parse_args(argv)
    check_loopback(args.host)
    if args.parent_pid is not None:
        exit_when_parent_dies(args.parent_pid)
    instance_id = os.environ.pop(INSTANCE_ENV, None)  # set by start_server, echoed by /health

    import uvicorn

    from utils.env import setup_notebook
    from utils.models import load_chat_model

    setup_notebook(seed=0, threads=args.threads)
    model, tokenizer = load_chat_model()
    # proxy_headers=False: no proxy stands in front, so X-Forwarded-For is not trusted
    app = create_app(model, tokenizer, instance_id=instance_id, batching=args.batching)
    uvicorn.run(app, host=args.host, port=args.port,
                log_level="warning", proxy_headers=False)


if __name__ == "__main__":
    main()
