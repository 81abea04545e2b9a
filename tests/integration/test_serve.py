"""`bigray serve` on real Ray Serve over real HTTP, driven by the official `openai` client.

The served model is a `tiny` Llama with a byte-level BPE, built and saved (safetensors) in the test.
Greedy outputs are checked against Hugging Face's own `generate`, configs against Ray's own schemas.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from bigray.config import load_config
from tests.conftest import free_port
from tests.unit.test_engine import CONTEXT, build_tiny_model

NAME = "tiny-test"
KEY_ENV = "BIGRAY_TEST_SERVE_KEY"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-export") / "export"))


@pytest.fixture(scope="module")
def server(ray_cluster, model_dir, s3):
    """One Serve instance for the module: the open app at /, and the same model from S3 behind an API key at /auth."""
    from ray import serve

    from bigray.serve import build_app, start, stop
    from bigray.storage import Store

    port = free_port()
    base = [
        f"serve.model={model_dir}",
        f"serve.port={port}",
        f"serve.model_name={NAME}",
        "serve.num_cpus=1",
        "serve.max_batch_size=32",
        "serve.max_n=4",
        "serve.max_body_bytes=65536",
    ]
    url = start(load_config(overrides=base))
    Store().copy_dir(model_dir, s3.uri("serve-model"))
    os.environ[KEY_ENV] = "s3cret-key"
    auth = load_config(
        overrides=[*base, f"serve.model={s3.uri('serve-model')}", "serve.num_cpus=0.5", f"serve.api_key=${{{KEY_ENV}}}"]
    )
    serve.run(build_app(auth), name="bigray-auth", route_prefix="/auth")
    yield url
    stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Hugging Face's own greedy decoding of the same dir: the independent reference for served text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32
    ).eval()

    def greedy(prompt: str, max_tokens: int) -> tuple[str, int]:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_tokens,
                pad_token_id=tok.eos_token_id,
            )
        new = out[0, ids.shape[1] :].tolist()
        return tok.decode(new, skip_special_tokens=True), len(new)

    greedy.tokenizer = tok
    return greedy


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(f"{url}/health", timeout=30).read())


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_and_greedy_completion_match_hf(client, reference):
    assert [m.id for m in client.models.list().data] == [NAME]
    prompt = "def encode(self, o):"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    text, n = reference(prompt, 12)
    assert r.choices[0].text == text
    assert r.usage.prompt_tokens == len(reference.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == n and r.usage.total_tokens == r.usage.prompt_tokens + n
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")


def test_replica_runs_at_serve_niceness(server):
    """Ray renices its worker processes to 15; a replica runs at serve.niceness (0) instead, as the OS reports it."""
    import psutil

    assert psutil.Process(health(server)["pid"]).nice() == 0


def test_prompt_list_logprobs_and_stream(client, reference, server):
    prompts = ["import json", "class JSONDecoder(object):"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for choice, prompt in zip(r.choices, prompts):
        assert choice.text == reference(prompt, 6)[0]
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
        # Greedy: the sampled token is the most likely one, so its logprob is the top entry's.
        assert all(abs(t - max(top.values())) < 1e-5 and t < 0 for t, top in zip(lp.token_logprobs, lp.top_logprobs))
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=prompts[0],
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference(prompts[0], 10)[0]
    assert chunks[-1].usage.completion_tokens == reference(prompts[0], 10)[1]
    # The raw wire format: server-sent events ending in data: [DONE].
    req = urllib.request.Request(
        f"{server}/v1/completions",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": NAME, "prompt": "x", "max_tokens": 3, "stream": True}).encode(),
    )
    events = [line for line in urllib.request.urlopen(req, timeout=60).read().decode().splitlines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_chat_default_template_and_stream(client, reference):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def main():"}]
    rendered = "system: You write Python.\nuser: def main():\nassistant:"  # the documented default template
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    text, n = reference(rendered, 8)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(reference.tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert r.usage.completion_tokens == n
    stream = list(
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    assert stream[-1].choices[0].finish_reason in ("length", "stop")
    lp = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    assert lp.choices[0].message.content == reference(rendered, 4)[0]
    assert len(lp.choices[0].logprobs.content) == 4 and all(
        len(t.top_logprobs) == 2 and t.logprob < 0 for t in lp.choices[0].logprobs.content
    )


def test_stop_strings(client, reference):
    prompt = "for key, value in"
    full, _ = reference(prompt, 16)
    stop = full[4:6]
    assert stop and len(full) > 6
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "a stop string that never appears"]
    )
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == full[: full.find(stop)]


def test_seeded_sampling_reproducible_in_any_batch_and_n(client):
    kw = dict(
        model=NAME, prompt="def dumps(obj,", max_tokens=16, temperature=1.0, top_p=0.95, extra_body={"top_k": 100}
    )
    alone = client.completions.create(seed=1234, **kw).choices[0].text
    assert client.completions.create(seed=1234, **kw).choices[0].text == alone
    # The same seeded request among 7 unseeded ones (a batch): still the same tokens.
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.completions.create, seed=1234 if i == 3 else None, **kw) for i in range(8)]
        texts = [f.result().choices[0].text for f in futures]
    assert texts[3] == alone
    assert client.completions.create(seed=99, **kw).choices[0].text != alone
    r = client.completions.create(seed=7, n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 3  # n samples, not one sample copied
    assert r.usage.completion_tokens <= 48 and (r.usage.completion_tokens == 48) == all(
        c.finish_reason == "length" for c in r.choices
    )
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4, seed=5
    )
    assert [c.index for c in chat.choices] == [0, 1]
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4, seed=5, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in chat.choices]


def test_32_concurrent_requests_batched_and_routed_right(client, server):
    prompts = [f"def handler_{i}(request{'_' * (i % 4)}):" + " return" * (i % 3) for i in range(32)]
    alone = [
        client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0).choices[0].text for p in prompts
    ]
    assert len(set(alone)) > 1  # distinct outputs, so a mix-up would show
    before = health(server)
    with ThreadPoolExecutor(32) as pool:
        together = list(
            pool.map(
                lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0).choices[0].text,
                prompts,
            )
        )
    after = health(server)
    assert together == alone
    assert after["requests"] - before["requests"] == 32
    assert after["batched_steps"] > before["batched_steps"] and after["max_batch_seen"] > 1


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("completions", b'{"model": "tiny-test", "prompt": ', 400, None),  # malformed JSON
        ("completions", b'["not", "an", "object"]', 400, None),
        ("completions", {"model": NAME, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),  # wrong type
        ("completions", {"model": NAME, "prompt": {"text": "x"}}, 400, "prompt"),
        ("completions", {"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),  # unknown model
        ("completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("completions", {"model": NAME, "prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),  # beyond the context
        (
            "completions",
            {"model": NAME, "prompt": "import json\n" * CONTEXT, "max_tokens": 1},
            400,
            "prompt",
        ),  # prompt too long
        ("completions", {"model": NAME, "prompt": "x", "n": 5}, 400, "n"),  # n > serve.max_n
        ("completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
        ("completions", {"model": NAME, "prompt": [1, 2, 10**9]}, 400, "prompt"),
        ("completions", {"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("chat/completions", {"model": NAME, "messages": []}, 400, "messages"),  # empty messages
        ("chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ("chat/completions", {"model": NAME}, 400, "messages"),
        ("completions", {"model": NAME, "prompt": "x" * 70_000}, 413, None),  # > serve.max_body_bytes
        ("completions", {"model": NAME, "prompt": ["a", "b", "c"], "n": 2}, 400, "prompt"),  # 6 sequences > max_n
        ("completions", {"model": NAME, "prompt": "x", "stop": "y" * 257}, 400, "stop"),  # stop string too long
    ],
)
def test_bad_input_is_an_openai_error(server, path, body, status, param):
    code, out = post(f"{server}/v1/{path}", body)
    assert code == status, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param


def test_server_keeps_serving_after_bad_input_and_openai_client_raises(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=NAME, prompt="x", max_tokens=10_000)
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).usage.completion_tokens >= 1


def test_disconnect_mid_stream_frees_the_slot(server):
    host, port = server.removeprefix("http://").split(":")
    before = health(server)["cancelled"]
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": NAME, "prompt": "import", "max_tokens": CONTEXT - 8, "stream": True, "temperature": 0}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.monotonic() + 30
    while (h := health(server))["cancelled"] == before or h["running"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["cancelled"] == before + 1


def test_api_key_from_env(server, model_dir):
    from openai import AuthenticationError, OpenAI

    url = f"{server}/auth/v1"
    assert post(f"{url}/completions", {"model": NAME, "prompt": "x"})[0] == 401
    code, out = post(f"{url}/completions", {"model": NAME, "prompt": "x"}, {"Authorization": "Bearer s3cret-kez"})
    assert code == 401 and out["error"]["type"] == "authentication_error"
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    good = OpenAI(base_url=url, api_key="s3cret-key", max_retries=0)
    assert [m.id for m in good.models.list().data] == [NAME]
    assert good.completions.create(model=NAME, prompt="x", max_tokens=3).usage.completion_tokens >= 1
    # The open app next to it needs no key.
    assert post(f"{server}/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1})[0] == 200


def test_stream_logprobs_cover_held_back_tokens_and_offsets_run_on(client, reference):
    prompt = "def encode(self, o):"
    # A long stop string that never appears holds back the last 11 characters' tokens until the end.
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            logprobs=1,
            stream=True,
            stop=["never-appears"],
            stream_options={"include_usage": True},
        )
    )
    tokens, offsets, lps = [], [], []
    for c in chunks:
        if c.choices and c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            offsets += c.choices[0].logprobs.text_offset
            lps += c.choices[0].logprobs.token_logprobs
    assert len(tokens) == len(lps) == chunks[-1].usage.completion_tokens == reference(prompt, 12)[1]
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]  # one running offset, not one per chunk
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, logprobs=1)
    assert whole.choices[0].logprobs.tokens == tokens and whole.choices[0].logprobs.text_offset == offsets
    # An empty stop string stops nothing.
    empty = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, stop="")
    assert empty.choices[0].text == reference(prompt, 8)[0]


def test_overload_gets_503_with_retry_after(server, model_dir):
    """A replica whose engine runs one sequence and queues one more refuses the rest at once."""
    from ray import serve

    from bigray.serve import build_app

    small = load_config(
        overrides=[
            f"serve.model={model_dir}",
            f"serve.model_name={NAME}",
            "serve.num_cpus=0.5",
            "serve.max_batch_size=1",
            "serve.max_waiting=1",
            "serve.max_ongoing_requests=8",
        ]
    )
    serve.run(build_app(small), name="bigray-small", route_prefix="/small")
    body = {"model": NAME, "prompt": "import", "max_tokens": 60, "temperature": 0}

    def send(_):
        req = urllib.request.Request(
            f"{server}/small/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, None, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Retry-After"), json.loads(err.read())

    try:
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(send, range(6)))
        codes = sorted(code for code, _, _ in results)
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, results
        refused = [(after, out) for code, after, out in results if code == 503]
        assert all(after == "1" and out["error"]["code"] == "overloaded" for after, out in refused)
        assert all(out["usage"]["completion_tokens"] >= 1 for code, _, out in results if code == 200)
    finally:
        serve.delete("bigray-small")


def test_metrics_on_rays_metrics_endpoint(server, client):
    """TTFT, inter-token latency, tokens, queue depth, rows and KV tokens reach Ray's Prometheus endpoint."""
    import ray

    client.completions.create(model=NAME, prompt="x", max_tokens=4)
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    wanted = [
        "bigray_serve_time_to_first_token_seconds",
        "bigray_serve_inter_token_latency_seconds",
        "bigray_serve_generated_tokens",
        "bigray_serve_queue_depth",
        "bigray_serve_running_rows",
        "bigray_serve_kv_tokens_in_use",
    ]
    deadline = time.monotonic() + 90
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
        missing = [m for m in wanted if m not in text]
        if not missing:
            break
        assert time.monotonic() < deadline, missing
        time.sleep(2)
    assert f'model="{NAME}"' in text


@pytest.mark.parametrize(
    "fault",
    [
        "killed loop",
        pytest.param("hung step", marks=pytest.mark.slow),
        pytest.param("failing steps", marks=pytest.mark.slow),
    ],
)
def test_broken_engine_fails_check_health_and_serve_replaces_the_replica(server, model_dir, fault):
    """A replica whose engine breaks fails Serve's health check; Serve starts a new replica and the app answers again.

    The fault is put into the live replica through a Serve handle call on a subclass with one extra method; what
    follows is the real engine's health() and Serve's own replacement."""
    from ray import serve

    from bigray.serve.app import OpenAIServer
    from bigray.serve.vllm import deployment_config
    from bigray.storage import Store

    class Breakable(OpenAIServer.func_or_class):
        @staticmethod
        def crash():
            raise RuntimeError("engine bug (injected)")

        def break_engine(self, how: str) -> int:
            import time as clock

            engine = self.engine
            if how == "killed loop":
                engine.step = self.crash  # the next step raises outside the guarded forward: the thread dies
            elif how == "hung step":
                forward = engine.model.forward
                engine.model.forward = lambda *a, **kw: (clock.sleep(3600), forward(*a, **kw))[1]
            else:
                engine.model.forward = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("CUDA error (injected)"))
            return os.getpid()

    cfg = load_config(
        overrides=[
            f"serve.model={model_dir}",
            f"serve.model_name={NAME}",
            "serve.num_cpus=0.5",
            "serve.health_check_period_s=1",
            "serve.step_timeout_s=2",
            "serve.max_consecutive_failures=2",
        ]
    )
    s = cfg.serve
    options = deployment_config(s) | {"ray_actor_options": {"num_cpus": s.num_cpus}}
    app = serve.deployment(Breakable, name="bigray").options(**options).bind(s.model_dump(mode="json"), Store(), None)
    handle = serve.run(app, name="bigray-heal", route_prefix="/heal")
    body = json.dumps({"model": NAME, "prompt": "import", "max_tokens": 4, "temperature": 0}).encode()

    def complete(timeout: float = 60) -> int:
        req = urllib.request.Request(f"{server}/heal/v1/completions", data=body, headers={"Content-Type": "x"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as err:
            return err.code

    def health() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{server}/heal/health", timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw)
            except ValueError:  # Serve's proxy answers in plain text while no replica is up
                return err.code, {"text": raw[:200]}

    try:
        assert complete() == 200
        broken = handle.break_engine.remote(fault).result(timeout_s=30)
        if fault == "killed loop":
            assert complete() == 500  # the request that meets the dead engine fails at once
            code, state = health()
            assert code == 503 and state["pid"] == broken and "loop stopped" in state["problem"]
        else:
            # A request meets the fault: it hangs (a timeout here) or fails; then the health check fails.
            with ThreadPoolExecutor(2) as pool:
                for _ in range(2):
                    try:
                        pool.submit(complete, 4).result(timeout=10)
                    except Exception:  # noqa: BLE001 - a hung request times out: that is the fault
                        pass
        deadline = time.monotonic() + 90
        while True:
            try:
                code, state = health()
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                code, state = 0, {}
            if code == 200 and state.get("pid") not in (None, broken):
                break
            assert time.monotonic() < deadline, (code, state)
            time.sleep(0.5)
        assert complete() == 200 and state["status"] == "ok"
    finally:
        serve.delete("bigray-heal")


@pytest.mark.slow
def test_cli_serves_until_sigterm(model_dir, tmp_path):
    """`bigray serve` end to end in its own process and its own local Ray: answers, then exits 0 on SIGTERM."""
    import signal

    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigray", "serve", f"serve.model={model_dir}", f"serve.port={port}", "ray.num_cpus=2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert f"http://127.0.0.1:{port}" in lines[-1], "".join(lines)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        name = client.models.list().data[0].id
        assert client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        ).choices
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_cli_serves_through_haproxy_ingress(model_dir, reference):
    """`bigray serve serve.ingress=haproxy` in its own local Ray: HAProxy itself listens on serve.port and the openai
    client's greedy completion, stream and chat answer through it as through Serve's proxy; SIGTERM exits 0."""
    import signal

    import psutil
    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bigray",
            "serve",
            f"serve.model={model_dir}",
            f"serve.port={port}",
            f"serve.model_name={NAME}",
            "serve.ingress=haproxy",
            "ray.num_cpus=2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert f"http://127.0.0.1:{port}" in lines[-1], "".join(lines)
        listeners = {
            c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listeners and {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}, listeners
        # In a Ray that bigray starts, Serve's processes run at serve.niceness (0), not Ray's 15: HAProxy too.
        assert {psutil.Process(pid).nice() for pid in listeners} == {0}
        assert psutil.Process(health(f"http://127.0.0.1:{port}")["pid"]).nice() == 0
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [NAME]
        prompt = "def encode(self, o):"
        text, n = reference(prompt, 12)
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == text and r.usage.completion_tokens == n
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        ).choices
        assert post(f"http://127.0.0.1:{port}/v1/completions", {"model": NAME, "prompt": 5})[0] == 400
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
