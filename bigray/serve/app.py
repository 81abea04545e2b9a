"""The OpenAI-compatible HTTP app: a FastAPI ingress on one Ray Serve deployment that owns an `Engine`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health. Errors are
OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}); a bad request never takes the
replica down. Bodies are parsed by hand (not as FastAPI body parameters) so that the API key is
checked before anything about the request is looked at.
"""

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import time
from typing import Annotated, Any, Literal

import psutil
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from bigray.config import ServeConfig
from bigray.errors import ConfigError
from bigray.serve.engine import Engine, Overloaded, SamplingParams, Unhealthy, adapter_base, request_id
from bigray.serve.metrics import ServeMetrics
from bigray.storage import Store

api = FastAPI(title="bigray serve")
log = logging.getLogger("bigray.serve")
MAX_STOP_CHARS = 256
INLINE_TOKENIZE_CHARS = 2048  # prompts up to this many characters are tokenized on the event loop

# The default chat prompt for tokenizers without a chat template (bigray's own BPE has none): one
# "<role>: <content>" line per message, then "assistant:" for the model to continue.
DEFAULT_CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    response = error_response(exc.status, exc.message, exc.type, exc.param, exc.code)
    if exc.status == 503:
        response.headers["Retry-After"] = str(Overloaded.retry_after_s)
    return response


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Still OpenAI-shaped, so clients report it; what went wrong (paths, values) stays in the replica's log.
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(500, "internal server error; the replica's log has the details", "server_error")


class _Body(BaseModel):
    # Clients send fields we do not use (user, presence_penalty, ...): ignore them, as OpenAI's servers do.
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # OpenAI's limit: up to 4 stop sequences
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


def resolve_api_key(value: str | None) -> str | None:
    """`serve.api_key` as given, or read from the environment for "${NAME}" / "env:NAME"."""
    if not value:
        return None
    m = re.fullmatch(r"\$\{(\w+)\}|env:(\w+)", value)
    if not m:
        return value
    name = m.group(1) or m.group(2)
    key = os.environ.get(name)
    if not key:
        raise ConfigError(f"serve.api_key refers to the environment variable {name}, which is not set")
    return key


def api_key_digest(value: str | None) -> bytes | None:
    """SHA-256 of the resolved key: what replicas compare against, so the key itself is stored nowhere."""
    key = resolve_api_key(value)
    return hashlib.sha256(key.encode()).digest() if key else None


def model_name(serve_cfg) -> str:
    """The id clients pass as `model`: serve.model_name, else the dir's name (the run's name for <run>/export)."""
    if serve_cfg.model_name:
        return serve_cfg.model_name
    parts = [p for p in serve_cfg.model.rstrip("/").split("/") if p]
    return parts[-2] if parts[-1] == "export" and len(parts) > 1 else parts[-1]


def _text(content) -> str:
    """Message content as plain text: a string, or the text parts of a content-parts list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type", "text") == "text")


async def _translated(events, timeout_s: float | None):
    """`events` from Engine.generate, its refusals raised as the APIError a client should see."""
    try:
        async for item in events:
            yield item
    except Overloaded as exc:
        raise APIError(503, f"server overloaded: {exc}; retry later", "server_error", code="overloaded") from None
    except Unhealthy as exc:
        raise APIError(503, f"engine unavailable: {exc}", "server_error", code="engine_unhealthy") from None
    except ValueError as exc:
        raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from None
    except TimeoutError:
        raise APIError(
            504, f"request took longer than serve.request_timeout_s={timeout_s:g} s", "server_error", code="timeout"
        ) from None
    finally:
        await events.aclose()


def _counting_errors(route):
    """Count a route's failures in the replica's metrics, by error code or exception class, then re-raise."""

    @functools.wraps(route)
    async def counted(self, request: Request):
        try:
            return await route(self, request)
        except APIError as exc:
            self.metrics.error(exc.code or exc.type)
            raise
        except Exception as exc:
            self.metrics.error(type(exc).__name__)
            raise

    return counted


# Everything the replica class uses is defined above it: Serve's ingress decorator copies the class (cloudpickle,
# by value) when the decorator runs, so a module-level name defined below it would be missing in the replica.
@serve.deployment(name="bigray")
@serve.ingress(api)
class OpenAIServer:
    """One replica: the model, its engine, and the OpenAI routes."""

    def __init__(self, serve_cfg: dict, store: Store, api_key_digest: bytes | None):
        s = ServeConfig.model_validate(serve_cfg)
        self.name = model_name(s)
        self.metrics = ServeMetrics(self.name)
        device = "cuda" if s.num_gpus > 0 else "cpu"
        model_dir = store.local_dir(s.model)
        base = adapter_base(model_dir)  # a LoRA adapter dir: its base (local or s3://), the adapter merged at load
        self.engine = Engine(
            model_dir,
            base_model_dir=store.local_dir(base) if base else None,
            max_batch_size=s.max_batch_size,
            batch_wait_timeout_s=s.batch_wait_timeout_s,
            device=device,
            dtype=s.dtype,
            num_threads=max(1, int(s.num_cpus)),
            kv_token_budget=s.kv_token_budget,
            prefill_chunk_tokens=s.prefill_chunk_tokens,
            max_waiting=s.max_waiting,
            step_timeout_s=s.step_timeout_s,
            max_consecutive_failures=s.max_consecutive_failures,
            metrics=self.metrics,
        )
        self.max_n, self.max_body, self.timeout_s = s.max_n, s.max_body_bytes, s.request_timeout_s
        self.api_key_digest = api_key_digest
        self.chat_template = self.engine.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        self.created = int(time.time())

    def check_health(self) -> None:
        """Serve's health probe: raising makes Serve replace this replica."""
        if problem := self.engine.health():
            raise RuntimeError(problem)

    # ---- routes -------------------------------------------------------------------------------------------

    @api.get("/health")
    async def health(self):
        """The engine's state and counters (requests, steps, ...); 503 when it cannot serve. Open without the key."""
        problem = self.engine.health()
        body = {
            "status": "unhealthy" if problem else "ok",
            "model": self.name,
            **self.engine.stats,
            **self.engine.load(),
            "pid": os.getpid(),
            "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        }
        if problem:
            return JSONResponse(body | {"problem": problem}, status_code=503)
        return body

    @api.get("/v1/models")
    @_counting_errors
    async def models(self, request: Request) -> dict:
        self._auth(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": self.name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "bigray",
                    "max_model_len": self.engine.context,
                }
            ],
        }

    @api.post("/v1/completions")
    @_counting_errors
    async def completions(self, request: Request):
        self._auth(request)
        body = await self._body(request, CompletionBody)
        prompts = body.prompt
        if isinstance(prompts, str) or prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        self._check_size(len(prompts), body.n)
        # Tokenizing a long prompt takes a while: off the event loop, which serves every other request. A short
        # one costs less than the hop to a worker thread.
        size = sum(len(p) for p in prompts if isinstance(p, str))
        prompts = (
            self._prompts(prompts) if size <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(self._prompts, prompts)
        )
        return await self._respond(body, prompts, chat=False)

    @api.post("/v1/chat/completions")
    @_counting_errors
    async def chat(self, request: Request):
        self._auth(request)
        body = await self._body(request, ChatBody)
        self._check_size(1, body.n)
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        size = sum(len(m["content"]) for m in messages)
        ids = (
            self._render_chat(messages)
            if size <= INLINE_TOKENIZE_CHARS
            else await asyncio.to_thread(self._render_chat, messages)
        )
        return await self._respond(body, [ids], chat=True)

    # ---- request handling ---------------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        if self.api_key_digest is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            hashlib.sha256(token.strip().encode()).digest(), self.api_key_digest
        ):
            raise APIError(
                401,
                "missing or invalid API key: send 'Authorization: Bearer <serve.api_key>'",
                "authentication_error",
                code="invalid_api_key",
            )

    async def _read(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to exceed serve.max_body_bytes (never read whole)."""
        too_big = APIError(
            413, f"request body exceeds {self.max_body} bytes (serve.max_body_bytes)", code="request_too_large"
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def _body(self, request: Request, schema: type[BaseModel]):
        try:
            raw = json.loads(await self._read(request))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            body = schema.model_validate(raw)
        except ValidationError as exc:
            errors = exc.errors()
            # For a union (stop: str | list) the member whose type matched says what is actually wrong.
            err = next((e for e in errors if not e["type"].endswith("_type")), errors[0])
            # Union members show up in the location ("prompt.str"): name only the request's own field path.
            param = (
                ".".join(str(p) for p in err["loc"] if isinstance(p, int) or p.isidentifier() and p not in _TYPE_TAGS)
                or None
            )
            raise APIError(
                400, f"{param}: {err['msg']}" if param else err["msg"], param=param, code="invalid_value"
            ) from None
        if body.model != self.name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.name!r}",
                param="model",
                code="model_not_found",
            )
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
        return body

    def _check_size(self, prompts: int, n: int) -> None:
        """Every prompt times n is one sequence: together they may not exceed serve.max_n."""
        if prompts * n > self.max_n:
            what = f"n={n}" if prompts == 1 else f"{prompts} prompts x n={n}"
            raise APIError(
                400,
                f"{what} asks for {prompts * n} sequences; this server allows {self.max_n} per request (serve.max_n)",
                param="n" if prompts == 1 else "prompt",
            )

    def _prompts(self, prompt: list) -> list[list[int]]:
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        vocab = len(self.engine.tokenizer)
        out = []
        for p in prompt:
            ids = self.engine.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt encodes to zero tokens", param="prompt")
            if any(not 0 <= i < vocab for i in ids):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def _render_chat(self, messages: list[dict]) -> list[int]:
        try:
            text = self.engine.tokenizer.apply_chat_template(
                messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages is the client's problem
            raise APIError(400, f"messages do not fit the model's chat template: {exc}", param="messages") from None
        return self.engine.encode(text)

    def _params(self, body, prompts: list[list[int]], chat: bool) -> list[tuple[list[int], SamplingParams]]:
        ctx = self.engine.context
        longest = max(len(p) for p in prompts)
        if longest >= ctx:
            raise APIError(
                400,
                f"the prompt has {longest} tokens; this model's context is {ctx} tokens",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        if max_tokens is None:
            max_tokens = ctx - longest  # chat's default: whatever room the context leaves
        if longest + max_tokens > ctx:
            raise APIError(
                400,
                f"max_tokens={max_tokens} plus the prompt's {longest} tokens exceeds this model's context of {ctx}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        # An empty stop string would match at once: it stops nothing, as in OpenAI's API.
        stop = tuple(s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or ()) if s)
        logprobs = (body.top_logprobs or 0) if chat and body.logprobs else (None if chat else body.logprobs)
        items = []
        for p in prompts:
            for j in range(body.n):
                # Choice j of a seeded request samples with seed + j: reproducible, yet the n choices differ.
                seed = None if body.seed is None else body.seed + j
                params = SamplingParams(
                    max_tokens, body.temperature, body.top_p, body.top_k, stop, seed, logprobs, bool(body.stream)
                )
                items.append((p, params))
        return items

    def _events(self, items):
        """The engine's events for `items`, with its refusals turned into OpenAI errors (503, 400, 504)."""
        return _translated(self.engine.generate(items, self.timeout_s), self.timeout_s)

    async def _respond(self, body, prompts: list[list[int]], chat: bool):
        items = self._params(body, prompts, chat)
        rid = request_id("chatcmpl" if chat else "cmpl")
        usage = {"prompt_tokens": sum(len(p) for p in prompts) * body.n, "completion_tokens": 0}
        events = self._events(items)
        if body.stream:
            # The first event is awaited here, so a refusal (overload, KV budget) is still an HTTP status.
            first = await anext(events, None)
            return StreamingResponse(
                self._stream(body, items, rid, usage, chat, first, events), media_type="text/event-stream"
            )
        texts = [""] * len(items)
        finish: list[str | None] = [None] * len(items)
        counts = [0] * len(items)
        lps: list[list] = [[] for _ in items]
        tokens: list[list[int]] = [[] for _ in items]
        async for i, ev in events:
            if ev.error:
                raise APIError(500, "generation failed; the replica's log has the details", "server_error")
            texts[i] += ev.text
            counts[i] = ev.completion_tokens
            tokens[i] += ev.token_ids
            lps[i] += ev.logprobs
            finish[i] = ev.finish_reason
        usage["completion_tokens"] = sum(counts)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choices = []
        for i, text in enumerate(texts):
            want_lp = items[i][1].logprobs is not None
            if chat:
                lp = {"content": self._chat_logprobs(tokens[i], lps[i])} if want_lp else None
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": finish[i],
                    }
                )
            else:
                lp = self._completion_logprobs(tokens[i], lps[i], 0)[0] if want_lp else None
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish[i]})
        # A JSONResponse as is: FastAPI would otherwise walk the whole dict through jsonable_encoder first.
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.name,
                "choices": choices,
                "usage": usage,
            }
        )

    async def _stream(self, body, items, rid: str, usage: dict, chat: bool, first, events):
        """Server-sent events in OpenAI's chunk format; a client leaving early frees the rows (generate()'s finally).

        A token whose text is held back (it may start a stop string) keeps its id and logprob until the chunk that
        carries its text, so a stream's logprobs cover every token, and text_offset runs on across chunks.
        """
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra) -> str:
            return (
                "data: "
                + json.dumps(
                    {"id": rid, "object": obj, "created": created, "model": self.name, "choices": choices, **extra}
                )
                + "\n\n"
            )

        if chat:
            yield chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(items))
                ]
            )
        counts = [0] * len(items)
        held_ids: list[list[int]] = [[] for _ in items]
        held_lps: list[list] = [[] for _ in items]
        offsets = [0] * len(items)

        async def all_events():
            if first is not None:
                yield first
            async for ev in events:
                yield ev

        try:
            async for i, ev in all_events():
                if ev.error:
                    raise APIError(500, "generation failed; the replica's log has the details", "server_error")
                counts[i] = ev.completion_tokens
                held_ids[i] += ev.token_ids
                held_lps[i] += ev.logprobs
                if not ev.text and ev.finish_reason is None:
                    continue
                ids, lps = held_ids[i], held_lps[i]
                held_ids[i], held_lps[i] = [], []
                want_lp = items[i][1].logprobs is not None
                if chat:
                    lp = {"content": self._chat_logprobs(ids, lps)} if want_lp else None
                    yield chunk(
                        [{"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": ev.finish_reason}]
                    )
                else:
                    lp = None
                    if want_lp:
                        lp, offsets[i] = self._completion_logprobs(ids, lps, offsets[i])
                    yield chunk([{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}])
        except APIError as exc:
            # Headers are gone: the error travels as an event, as OpenAI's servers send it.
            self.metrics.error(exc.code or exc.type)
            yield (
                "data: "
                + json.dumps(
                    {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
                )
                + "\n\n"
            )
            return
        if (body.stream_options or {}).get("include_usage"):
            usage["completion_tokens"] = sum(counts)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            yield chunk([], usage=usage)
        yield "data: [DONE]\n\n"

    def _completion_logprobs(self, tokens: list[int], lps: list, offset: int) -> tuple[dict, int]:
        """Legacy completions logprobs for `tokens`, text offsets counted from `offset`; also the offset after them."""
        text = self.engine.token_text
        pieces = [text(t) for t in tokens]
        offsets = []
        for piece in pieces:
            offsets.append(offset)
            offset += len(piece)
        return {
            "tokens": pieces,
            "token_logprobs": [lp for lp, _ in lps],
            "top_logprobs": [{text(t): v for t, v in top.items()} for _, top in lps],
            "text_offset": offsets,
        }, offset

    def _chat_logprobs(self, tokens: list[int], lps: list) -> list[dict]:
        text = self.engine.token_text
        return [
            {
                "token": text(t),
                "logprob": lp,
                "bytes": list(text(t).encode()),
                "top_logprobs": [
                    {"token": text(k), "logprob": v, "bytes": list(text(k).encode())} for k, v in top.items()
                ],
            }
            for t, (lp, top) in zip(tokens, lps)
        ]
