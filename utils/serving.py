"""An OpenAI-compatible chat API for the course's model, served on this machine only (lesson 11).

Most LLM applications talk to a model through one HTTP interface: OpenAI's *chat completions*
(`POST /v1/chat/completions`). Hosted providers and local servers (vLLM, llama.cpp, Ollama, TGI)
all speak it, so the same client code works against any of them by changing `base_url`.
This module is a small, readable server that follows that schema for SmolLM2:

* `create_app(model, tokenizer)` -> a FastAPI app with `GET /health`, `GET /v1/models`,
  `GET /v1/models/{id}` and `POST /v1/chat/completions` (plain JSON, or Server-Sent Events when
  `"stream": true`, ending with `data: [DONE]`).
* Bad requests get a proper 4xx with OpenAI's error body
  `{"error": {"message", "type", "param", "code"}}`: 400 for invalid values (empty `messages`,
  `max_tokens < 1`, `temperature` outside [0, 2], a prompt longer than the context window),
  404 for an unknown model or route, 422 for a body of the wrong shape (missing fields, wrong types,
  not JSON).
* `stream_text(...)`: the generation behind plain and streamed answers: lesson 06's decoding loop
  (`utils.sampling.stream_tokens`), turned into text pieces that stop at a stop string.
* `start_server()` runs it in a child process bound to 127.0.0.1 (loopback only: other machines
  cannot reach it), waits until `/health` answers, and returns a handle whose `stop()` ends it.
  That plumbing (processes, ports, clean-up) lives in `utils.server_process`.

Run it by hand with `python -m utils.serving --port 8000` and call it with the `openai` client:
`OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from contextlib import nullcontext
from typing import Annotated, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Strict

from utils.sampling import stream_tokens
from utils.server_process import (  # noqa: F401  (start_server, ChatServer, stop_all_servers: re-exported)
    ChatServer,
    check_loopback,
    exit_when_parent_dies,
    start_server,
    stop_all_servers,
)

MODEL_ID = "SmolLM2-135M-Instruct"  # the name clients pass as `model`
ROLES = ("system", "developer", "user", "assistant")
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]


# ----------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An error the API reports to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


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
                seed=None, step_lock=None) -> Iterator[tuple[str, str | None, int]]:
    """Yield (text piece, finish_reason or None, completion tokens so far) as tokens arrive.

    The tokens come from lesson 06's KV-cached decoding loop, `stream_tokens` (batch of one, (1, T)
    prompt). finish_reason is "stop" (end-of-sequence token or a stop string) or "length"
    (max_tokens). step_lock: held around each step, so that concurrent requests take turns on the
    CPU. Shown in lesson 11.
    """
    stops = [s for s in stop if s]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id} | set(eos if isinstance(eos, (list, tuple)) else [eos])
    eos = {int(t) for t in eos if t is not None}
    steps = stream_tokens(model, input_ids, max_tokens, temperature, top_p=top_p, eos_token_id=eos or None,
                          generator=generator)
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
        safe = len(text) - held_back_chars(text, stops)
        if safe > sent:
            yield text[sent:safe], None, len(tokens)
            sent = safe
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    yield text[sent:], ("length" if len(tokens) == max_tokens else "stop"), len(tokens)


# ----------------------------------------------------------------------------------------------
# The app


class TextPart(BaseModel):
    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls... are accepted and ignored
    role: str
    content: str | list[TextPart] | None = None


StrictInt = Annotated[int, Strict()]  # "5" is not a number of tokens
StrictBool = Annotated[bool, Strict()]


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions (the parameters this server uses)."""

    model_config = ConfigDict(extra="allow")  # other OpenAI parameters are accepted and ignored
    model: str
    messages: list[Message]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # the newer name of max_tokens
    temperature: float | None = None
    top_p: float | None = None
    n: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None


def validate_request(req, model_ids: tuple[str, ...], max_context: int, default_max_tokens: int) -> dict:
    """Check the values of a well-formed request; raise APIError(400/404) like OpenAI does.

    Returns the settings to generate with: messages (role/content dicts), max_tokens, temperature,
    top_p, stop (list), seed.
    """
    if not req.messages:
        raise APIError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1, "
                       "but got an empty array instead.", "messages", "empty_array")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"Invalid value: '{m.role}'. Supported values are: "
                           f"{', '.join(repr(r) for r in ROLES)}.", f"messages[{i}].role", "invalid_value")
        content = m.content
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if any(part.type != "text" for part in content):
                raise APIError(400, "This model accepts only text content parts.",
                               f"messages[{i}].content", "invalid_value")
            content = "".join(part.text for part in content)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})

    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif max_tokens < 1:
        raise APIError(400, f"Invalid '{name}': integer below minimum value. Expected a value >= 1, "
                       f"but got {max_tokens} instead.", name, "integer_below_min_value")
    temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default is 1
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise APIError(400, f"Invalid 'temperature': expected a value in [0, {MAX_TEMPERATURE:g}], "
                       f"but got {temperature} instead.", "temperature", "invalid_value")
    top_p = req.top_p
    if top_p is not None and not 0 < top_p <= 1:
        raise APIError(400, f"Invalid 'top_p': expected a value in (0, 1], but got {top_p} instead.",
                       "top_p", "invalid_value")
    if req.n not in (None, 1):
        raise APIError(400, f"Invalid 'n': this server returns one choice per request (n=1), got "
                       f"{req.n}.", "n", "unsupported_value")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4:
        raise APIError(400, "Invalid 'stop': at most 4 stop sequences are allowed.", "stop", "invalid_value")
    if req.model not in model_ids:
        raise APIError(404, f"The model '{req.model}' does not exist. Available: {', '.join(model_ids)}.",
                       "model", "model_not_found")
    return {"messages": messages, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p if top_p != 1 else None, "stop": stop, "seed": req.seed,
            "max_context": max_context}


def create_app(model, tokenizer, model_id: str = MODEL_ID, default_max_tokens: int = 256):
    """A FastAPI app serving `model` (a transformers causal LM) with OpenAI's chat-completions schema."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llm-course chat API", version="1")
    max_context = int(getattr(model.config, "max_position_embeddings", 2048))
    created = int(time.time())
    step_lock = threading.Lock()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _shape_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("The request body is not valid JSON.", code="json_invalid"),
                                status_code=422)
        param = ""  # ('body', 'messages', 0, 'role') -> "messages[0].role", as OpenAI names params
        for part in first.get("loc", ())[1:]:
            param += f"[{part}]" if isinstance(part, int) else f".{part}" if param else str(part)
        message = f"Invalid '{param}': {first.get('msg')}" if param else f"Invalid body: {first.get('msg')}"
        return JSONResponse(error_body(message, param=param or None, code=first.get("type")),
                            status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException):
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
    def health():
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str):
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist.", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest):  # a plain def: FastAPI runs it in a thread
        settings = validate_request(req, (model_id,), max_context, default_max_tokens)
        input_ids = tokenizer.apply_chat_template(settings["messages"], add_generation_prompt=True,
                                                  return_tensors="pt", return_dict=True)["input_ids"]
        prompt_tokens = input_ids.shape[1]
        if prompt_tokens + settings["max_tokens"] > max_context:
            raise APIError(400, f"This model's maximum context length is {max_context} tokens. However, "
                           f"you requested {prompt_tokens + settings['max_tokens']} tokens "
                           f"({prompt_tokens} in the messages, {settings['max_tokens']} in the "
                           "completion).", "messages", "context_length_exceeded")
        pieces = stream_text(model, tokenizer, input_ids, settings["max_tokens"], settings["temperature"],
                             settings["top_p"], settings["stop"], settings["seed"], step_lock)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())

        def usage(n: int) -> dict:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}

        if not req.stream:
            text, finish, n = "", "stop", 0
            for piece, finish_reason, tokens_so_far in pieces:
                text += piece
                finish, n = finish_reason or finish, tokens_so_far
            return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_id,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": finish}],
                    "usage": usage(n)}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason=None, choices=True, usage_value=None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": now,
                    "model": model_id, "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish_reason}] if choices else []}
            if include_usage:
                body["usage"] = usage_value
            return f"data: {json.dumps(body)}\n\n"  # one Server-Sent Event

        def events() -> Iterator[str]:
            yield chunk({"role": "assistant", "content": ""})
            n = 0
            for piece, finish_reason, tokens_so_far in pieces:
                n = tokens_so_far
                if piece:
                    yield chunk({"content": piece})
                if finish_reason:
                    yield chunk({}, finish_reason)
            if include_usage:
                yield chunk({}, choices=False, usage_value=usage(n))
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
    args = parser.parse_args(argv)
    check_loopback(args.host)
    if args.parent_pid is not None:
        exit_when_parent_dies(args.parent_pid)

    import uvicorn

    from utils.env import setup_notebook
    from utils.models import load_chat_model

    setup_notebook(seed=0, threads=args.threads)
    model, tokenizer = load_chat_model()
    uvicorn.run(create_app(model, tokenizer), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
