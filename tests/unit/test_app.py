"""The HTTP app's request handling without Serve: the replica class's own methods over a real engine and real
Starlette requests (limits, stop strings, error bodies, health)."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.requests import Request

from bigray.serve.app import MAX_STOP_CHARS, APIError, CompletionBody, OpenAIServer, _api_error, _internal_error
from bigray.serve.engine import Engine, Overloaded
from bigray.serve.metrics import EngineMetrics
from tests.unit.test_engine import build_tiny_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An OpenAIServer instance without Serve: its __init__ needs a replica, so the fields it sets are set here."""
    model_dir = build_tiny_model(str(tmp_path_factory.mktemp("tiny-app") / "export"))
    # The class as written (Serve's ingress wraps it in a subclass that needs a running replica).
    cls = next(c for c in OpenAIServer.func_or_class.__mro__ if "check_health" in vars(c))
    srv = cls.__new__(cls)
    srv.engine = Engine(model_dir, device="cpu", num_threads=1, max_consecutive_failures=1)
    srv.name, srv.max_n, srv.max_body, srv.timeout_s, srv.api_key_digest = "m", 4, 4096, None, None
    srv.metrics = EngineMetrics()
    return srv


def request(body: bytes, declared: int | None = None) -> Request:
    """A real Starlette request whose body arrives in 1 KiB chunks; `declared` is its Content-Length header."""
    chunks = [body[i : i + 1024] for i in range(0, len(body), 1024)] or [b""]
    sent = []

    async def receive():
        sent.append(1)
        i = len(sent) - 1
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    req = Request({"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}, receive)
    req.chunks_read = sent
    return req


def parse(server, raw: dict | bytes, declared: int | None = None):
    data = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    return asyncio.run(server._body(request(data, declared), CompletionBody))


def test_body_size_limit_is_413_before_reading_it_all(server):
    big = json.dumps({"model": "m", "prompt": "x" * 10_000}).encode()
    with pytest.raises(APIError) as err:
        parse(server, big)  # no Content-Length (chunked): refused once the limit is crossed
    assert err.value.status == 413
    req = request(big, declared=len(big))
    with pytest.raises(APIError) as err:
        asyncio.run(server._body(req, CompletionBody))
    assert err.value.status == 413 and req.chunks_read == []  # the declared size alone was enough
    assert parse(server, {"model": "m", "prompt": "x"}).prompt == "x"


def test_sequences_per_request_and_stop_strings_are_bounded(server):
    server._check_size(2, 2)
    with pytest.raises(APIError) as err:
        server._check_size(3, 2)  # 3 prompts x n=2 = 6 > max_n=4
    assert err.value.status == 400 and err.value.param == "prompt"
    with pytest.raises(APIError) as err:
        server._check_size(1, 5)
    assert err.value.param == "n"
    parse(server, {"model": "m", "prompt": "x", "stop": "y" * MAX_STOP_CHARS})
    with pytest.raises(APIError) as err:
        parse(server, {"model": "m", "prompt": "x", "stop": ["a", "y" * (MAX_STOP_CHARS + 1)]})
    assert err.value.status == 400 and err.value.param == "stop"


def test_empty_stop_string_stops_nothing(server):
    for stop in ("", ["", "end"]):
        body = parse(server, {"model": "m", "prompt": "x", "stop": stop, "max_tokens": 4})
        ((_, params),) = server._params(body, [[1, 2]], chat=False)
        assert params.stop == (() if stop == "" else ("end",))


def test_error_bodies_say_nothing_internal_and_503_says_when_to_retry():
    req = request(b"")
    out = asyncio.run(_internal_error(req, ValueError("/secret/path/model.safetensors is corrupt")))
    assert out.status_code == 500 and b"secret" not in out.body and b"ValueError" not in out.body
    assert json.loads(out.body)["error"]["type"] == "server_error"
    busy = asyncio.run(_api_error(req, APIError(503, "server overloaded", "server_error", code="overloaded")))
    assert busy.status_code == 503 and busy.headers["retry-after"] == str(Overloaded.retry_after_s)


def test_check_health_raises_when_the_engine_loop_died(server):
    async def run():
        server.check_health()  # healthy: returns
        async for _ in server.engine.generate([(server.engine.encode("x"), _greedy())]):
            pass
        server.engine.step = _crash  # a bug outside the guarded forward: the engine thread dies
        async for _ in server.engine.generate([(server.engine.encode("x"), _greedy())]):
            pass
        with pytest.raises(RuntimeError, match="engine loop stopped"):
            server.check_health()

    asyncio.run(run())


def _crash():
    raise RuntimeError("engine bug (injected)")


def _greedy():
    from bigray.serve.engine import SamplingParams

    return SamplingParams(max_tokens=2, temperature=0)


def test_replica_class_has_every_module_name_it_uses():
    """Serve's ingress copies the class when it is decorated: a helper defined below it would be missing there."""
    import dis

    import bigray.serve.app as module

    cls = next(c for c in OpenAIServer.func_or_class.__mro__ if "check_health" in vars(c))  # the copy Serve ships
    for name, fn in vars(cls).items():
        fn = getattr(fn, "__wrapped__", fn)
        if not hasattr(fn, "__code__"):
            continue
        used = {i.argval for i in dis.get_instructions(fn) if i.opname == "LOAD_GLOBAL" and i.argval in vars(module)}
        assert used <= set(fn.__globals__), (name, used - set(fn.__globals__))
