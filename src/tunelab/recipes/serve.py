"""`tunelab serve`: an OpenAI-compatible HTTP server over one base in memory, adapters switched per request.

    tunelab serve runs/sft-lora --adapter other=runs/other-lora
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "sft-lora", "messages": [{"role": "user", "content": "Where does Ada live?"}]}'

Endpoints: GET /v1/models, POST /v1/chat/completions and /v1/completions (both with `stream`: server-sent
events, `data: {chunk}` lines and `data: [DONE]`). The `model` field picks what answers: the served model
by its name, each `--adapter NAME`, and `base` (adapters off) when adapters are loaded. One request
generates at a time (a lock around the model): concurrent requests queue, and each gets exactly the
answer it gets alone.

Defaults that differ from OpenAI's: `temperature` 0 (greedy, as `tunelab generate`); `max_tokens` 256.
Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, never a traceback.

Security (../shared/RELIABILITY.md): bound to 127.0.0.1 unless `--host` says otherwise, and then only with
a token (`--token` or TUNELAB_SERVE_TOKEN) that every request must carry as `Authorization: Bearer
TOKEN`; POST bodies must be JSON (`Content-Type: application/json`: no cross-site form can send one) of
at most 1 MiB; no CORS headers (a page elsewhere cannot read the answers).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import nn

from tunelab.artifacts import load
from tunelab.errors import TunelabError
from tunelab.inference.generation import encode_prompt, reply_lead, reply_text, stop_token_ids

MAX_BODY = 1 << 20
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 4096


# ----------------------------------------------------------------------------- the models


@dataclass
class Served:
    """The model in memory and the names requests may ask for: name -> peft adapter name (None: the
    model as loaded; "" : the base with adapters disabled)."""

    model: nn.Module
    tokenizer: Any
    names: dict[str, str | None]
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def _adapter_dir(path: str) -> Path:
    p = Path(path)
    final = p / "final" if (p / "config.yaml").is_file() else p
    if not (final / "adapter_config.json").is_file():
        raise TunelabError(f"{path}: not a peft adapter (no adapter_config.json in {final}); --adapter takes LoRA-like "
                           "runs or adapter folders", fix=f"serve it on its own: tunelab serve {path}")
    return final


def _name(path: str) -> str:
    p = Path(path)
    return p.name if p.exists() else path


def load_served(main: str, adapters: dict[str, str] | None = None, *, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> Served:
    """`main` (a run dir, adapter, model dir, hub id or tunelab-tiny) and the peft adapters in `adapters`
    (name -> run dir or adapter dir), all over `main`'s base."""
    adapters = adapters or {}
    model, tokenizer = load(main, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    names: dict[str, str | None] = {}
    main_name = _name(main)
    if isinstance(model, PeftModel):
        names[main_name] = model.active_adapter
        base_name = model.peft_config[model.active_adapter].base_model_name_or_path
    else:
        names[main_name] = None
        base_name = None
    for name, path in adapters.items():
        if name in names or name == "base":
            raise TunelabError(f"--adapter {name}={path}: the name {name!r} is taken",
                               fix="give each adapter its own name")
        folder = _adapter_dir(path)
        theirs = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        if base_name is not None and theirs != base_name:
            raise TunelabError(f"--adapter {name}={path}: its base is {theirs}, the served model's is {base_name}",
                               fix="serve adapters of one base together")
        if isinstance(model, PeftModel):
            model.load_adapter(str(folder), adapter_name=name)
        else:
            if Path(main).exists() and (Path(main) / "config.yaml").is_file():
                raise TunelabError(f"{main}: a run whose method is not a peft adapter; adapters switch over a base "
                                   "model or a LoRA-like run", fix=f"serve {main} alone, or serve the base with "
                                   "--adapter for each run")
            model = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
            base_name = theirs
        names[name] = name
    if isinstance(model, PeftModel):
        prompt_learning = [n for n, c in model.peft_config.items() if getattr(c, "is_prompt_learning", False)]
        if prompt_learning:
            raise TunelabError(f"{main}: serve runs LoRA-like adapters, full and delta models; "
                               f"{', '.join(prompt_learning)} is a prompt-learning adapter (prefix, prompt, P-tuning)",
                               fix="answer with it through tunelab generate; serve LoRA-like runs")
        names.setdefault("base", "")
        if names.get(main_name) is None:  # a plain base with adapters: its own name means adapters off
            names[main_name] = ""
    model.eval()
    return Served(model, tokenizer, names)


# ----------------------------------------------------------------------------- requests


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (user, logit_bias ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str | list[str]


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.param, self.code)


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# ----------------------------------------------------------------------------- generation


@dataclass
class Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    lead: str = ""  # the chat template's reply lead, dropped from the text (inference/generation.reply_lead)


def _stream_tokens(served: Served, adapter: str | None, job: Job) -> Iterator[int]:
    """New token ids, one by one, the model's own stop token last when it stops; holds the lock throughout."""
    model = served.model
    stop_ids = set(stop_token_ids(model, served.tokenizer))
    with served.lock, torch.no_grad():
        ctx = model.disable_adapter() if adapter == "" else contextlib.nullcontext()
        if adapter:
            model.set_adapter(adapter)
        with ctx:
            gen = torch.Generator().manual_seed(job.seed) if job.seed is not None else None
            ids = torch.tensor([job.prompt_ids])
            past = None
            for _ in range(job.max_tokens):
                out = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()  # (V,)
                token = _pick(logits, job.temperature, job.top_p, gen)
                yield token
                if token in stop_ids:
                    return
                ids = torch.tensor([[token]])


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def _texts(served: Served, adapter: str | None, job: Job) -> Iterator[tuple[str, str | None, int]]:
    """(new text, finish reason or None, completion tokens so far): the reply decoded as a whole each step
    (multi-byte characters never split), cut at the first stop string; text that could still become a
    stop string is held back until it cannot."""
    tok = served.tokenizer
    stop_ids = set(stop_token_ids(served.model, tok))
    ids: list[int] = []
    sent = 0
    hold = max((len(s) for s in job.stops), default=1) - 1
    for token in _stream_tokens(served, adapter, job):
        ids.append(token)
        if token in stop_ids:
            text = reply_text(tok, ids[:-1], job.lead)
            cut = _cut(text, job.stops)
            yield (cut if cut is not None else text)[sent:], "stop", len(ids)
            return
        text = reply_text(tok, ids, job.lead)
        cut = _cut(text, job.stops)
        if cut is not None:
            yield cut[sent:], "stop", len(ids)
            return
        safe = len(text) - hold
        while safe > sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for its bytes
            safe -= 1
        if safe > sent:
            yield text[sent:safe], None, len(ids)
            sent = safe
    text = reply_text(tok, ids, job.lead)
    yield text[sent:], "length", len(ids)


def _cut(text: str, stops: list[str]) -> str | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


# ----------------------------------------------------------------------------- the app


def create_app(served: Served, token: str | None = None) -> FastAPI:
    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if token is not None:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
                return error_response(401, "a valid token is required: Authorization: Bearer TOKEN",
                                      code="invalid_api_key")
        if request.method == "POST":
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
                return error_response(415, "the body must be JSON (Content-Type: application/json)")
            size = request.headers.get("content-length")
            if size is None or not size.isdigit() or int(size) > MAX_BODY:
                return error_response(413, f"the body must have a Content-Length of at most {MAX_BODY:,} bytes")
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - a request never gets a traceback
            return error_response(500, f"internal error ({type(e).__name__}); the server log has the details",
                                  kind="server_error")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, "the body is not valid JSON")
        key = ".".join(loc) or None
        return error_response(400, f"{key or 'body'}: {err.get('msg', 'invalid')}", param=key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tunelab"}
                                           for n in served.names]}

    @app.post("/v1/chat/completions")
    def chat(body: ChatBody) -> Any:
        adapter = _adapter_of(served, body.model)
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return _respond(served, adapter, body, encode_prompt(served.tokenizer, messages, chat=True), chat=True)

    @app.post("/v1/completions")
    def completions(body: CompletionBody) -> Any:
        adapter = _adapter_of(served, body.model)
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        return _respond(served, adapter, body, encode_prompt(served.tokenizer, prompts[0], chat=False), chat=False)

    return app


def _adapter_of(served: Served, model: str) -> str | None:
    if model not in served.names:
        raise ApiError(404, f"the model {model!r} does not exist; served: {', '.join(served.names)}", param="model",
                       code="model_not_found")
    return served.names[model]


def _respond(served: Served, adapter: str | None, body: _Body, prompt_ids: list[int], chat: bool) -> Any:
    limit = body.max_completion_tokens or body.max_tokens
    room = served.context - len(prompt_ids)
    if room < 1:
        raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens; this model's context is {served.context}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    if limit is not None and (limit > room or limit > MAX_TOKENS_LIMIT):
        raise ApiError(400, f"max_tokens {limit} is more than the {min(room, MAX_TOKENS_LIMIT)} this request can have "
                       f"(context {served.context}, prompt {len(prompt_ids)} tokens)", param="max_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    job = Job(prompt_ids, min(limit or DEFAULT_MAX_TOKENS, room), body.temperature, body.top_p, body.seed, stops,
              reply_lead(served.tokenizer) if chat else "")
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_sse(served, adapter, job, body.model, rid, created, chat),
                                 media_type="text/event-stream")
    text, finish, n = "", "length", 0
    for piece, reason, count in _texts(served, adapter, job):
        text, finish, n = text + piece, reason or finish, count
    usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model, "choices": [choice],
                "usage": usage}
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": [choice],
            "usage": usage}


def _sse(served: Served, adapter: str | None, job: Job, model: str, rid: str, created: int,
         chat: bool) -> Iterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: dict[str, Any] | str, finish: str | None) -> str:
        choice = ({"index": 0, "delta": delta, "finish_reason": finish} if chat else
                  {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None})
        return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": model,
                                      "choices": [choice]}) + "\n\n"

    if chat:
        yield chunk({"role": "assistant", "content": ""}, None)
    for piece, reason, _n in _texts(served, adapter, job):
        if piece:
            yield chunk({"content": piece} if chat else piece, None)
        if reason is not None:
            yield chunk({} if chat else "", reason)
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- running it


def check_bind(host: str, token: str | None) -> None:
    """Loopback needs nothing; any other address needs a token."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not token:
        raise TunelabError(f"--host {host} exposes the server beyond this machine, and no token is set",
                           fix="pass --token TOKEN (or set TUNELAB_SERVE_TOKEN), or bind to 127.0.0.1")


def serve(main: str, adapters: dict[str, str] | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          token: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
          say: Any = print) -> None:
    """Load and serve until interrupted."""
    check_bind(host, token)
    served = load_served(main, adapters, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    say(f"serving {', '.join(served.names)} on http://{host}:{port}/v1" + (" (token required)" if token else ""))
    uvicorn.run(create_app(served, token), host=host, port=port, log_level="warning")
