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
import sysconfig
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bigray.config import load_config
from bigray.errors import ConfigError

CONTEXT = 96
NAME = "tiny-test"
KEY_ENV = "BIGRAY_TEST_SERVE_KEY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(out: str, context: int = CONTEXT) -> str:
    """A random-init `tiny` preset Llama plus a 512-token BPE trained on a few stdlib files, saved as an HF dir."""
    import torch
    from transformers import AutoTokenizer

    from bigray.config import ModelConfig
    from bigray.data.tokenizer import train_bpe
    from bigray.train.model import build_model, model_config

    texts = [p.read_text() for p in sorted(Path(sysconfig.get_paths()["stdlib"], "json").glob("*.py"))]
    train_bpe(texts, 512, out)
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    torch.manual_seed(0)
    model = build_model(model_config(ModelConfig(preset="tiny"), len(tok), context, tok.eos_token_id))
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-export") / "export"))


@pytest.fixture(scope="module")
def server(ray_cluster, model_dir, s3):
    """One Serve instance for the module: the open app at /, and the same model from S3 behind an API key at /auth."""
    from ray import serve

    from bigray import storage
    from bigray.serve import build_app, start, stop

    port = _free_port()
    base = [f"serve.model={model_dir}", f"serve.port={port}", f"serve.model_name={NAME}", "serve.num_cpus=1", "serve.max_batch_size=32",
            "serve.max_n=4"]
    url = start(load_config(overrides=base))
    storage.copy_dir(model_dir, s3.uri("serve-model"))
    os.environ[KEY_ENV] = "s3cret-key"
    auth = load_config(overrides=[*base, f"serve.model={s3.uri('serve-model')}", "serve.num_cpus=0.5", f"serve.api_key=${{{KEY_ENV}}}"])
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
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32).eval()

    def greedy(prompt: str, max_tokens: int) -> tuple[str, int]:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_tokens, pad_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
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
    chunks = list(client.completions.create(model=NAME, prompt=prompts[0], max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference(prompts[0], 10)[0]
    assert chunks[-1].usage.completion_tokens == reference(prompts[0], 10)[1]
    # The raw wire format: server-sent events ending in data: [DONE].
    req = urllib.request.Request(f"{server}/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": NAME, "prompt": "x", "max_tokens": 3, "stream": True}).encode())
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
    stream = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == text
    assert stream[-1].choices[0].finish_reason in ("length", "stop")
    lp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert lp.choices[0].message.content == reference(rendered, 4)[0]
    assert len(lp.choices[0].logprobs.content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob < 0 for t in lp.choices[0].logprobs.content)


def test_stop_strings(client, reference):
    prompt = "for key, value in"
    full, _ = reference(prompt, 16)
    stop = full[4:6]
    assert stop and len(full) > 6
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "a stop string that never appears"])
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0,
                                                                            stop=stop, stream=True))
    assert streamed == full[: full.find(stop)]


def test_seeded_sampling_reproducible_in_any_batch_and_n(client):
    kw = dict(model=NAME, prompt="def dumps(obj,", max_tokens=16, temperature=1.0, top_p=0.95, extra_body={"top_k": 100})
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
    assert r.usage.completion_tokens <= 48 and (r.usage.completion_tokens == 48) == all(c.finish_reason == "length" for c in r.choices)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4, seed=5, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert [streamed[0], streamed[1]] == [c.message.content for c in chat.choices]


def test_32_concurrent_requests_batched_and_routed_right(client, server):
    prompts = [f"def handler_{i}(request{'_' * (i % 4)}):" + " return" * (i % 3) for i in range(32)]
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0).choices[0].text for p in prompts]
    assert len(set(alone)) > 1  # distinct outputs, so a mix-up would show
    before = health(server)
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda p: client.completions.create(model=NAME, prompt=p, max_tokens=12, temperature=0).choices[0].text, prompts))
    after = health(server)
    assert together == alone
    assert after["requests"] - before["requests"] == 32
    assert after["batched_steps"] > before["batched_steps"] and after["max_batch_seen"] > 1


@pytest.mark.parametrize("path,body,status,param", [
    ("completions", b'{"model": "tiny-test", "prompt": ', 400, None),                                   # malformed JSON
    ("completions", b'["not", "an", "object"]', 400, None),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),        # wrong type
    ("completions", {"model": NAME, "prompt": {"text": "x"}}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),                                 # unknown model
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": NAME, "prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens"),        # beyond the context
    ("completions", {"model": NAME, "prompt": "import json\n" * CONTEXT, "max_tokens": 1}, 400, "prompt"),  # prompt too long
    ("completions", {"model": NAME, "prompt": "x", "n": 5}, 400, "n"),                                # n > serve.max_n
    ("completions", {"model": NAME, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("completions", {"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("chat/completions", {"model": NAME, "messages": []}, 400, "messages"),                           # empty messages
    ("chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat/completions", {"model": NAME}, 400, "messages"),
])
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


def test_missing_key_variable_fails_before_deploying(model_dir):
    from bigray.serve import build_app

    with pytest.raises(ConfigError, match="BIGRAY_NO_SUCH_VAR"):
        build_app(load_config(overrides=[f"serve.model={model_dir}", "serve.api_key=env:BIGRAY_NO_SUCH_VAR"]))


def test_pickle_weights_are_refused(tmp_path, model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    from bigray.serve.engine import Engine

    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(model_dir, name), tmp_path / name)
    torch.save(load_file(os.path.join(model_dir, "model.safetensors")), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        Engine(str(tmp_path))


def test_app_builder_and_deploy_config_match_ray_schema(model_dir, monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from bigray.serve import app_builder

    app = app_builder({"model": model_dir, "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 4},
                       "num_cpus": "0.5", "max_batch_size": "8"})
    dep = app._bound_deployment
    assert dep._deployment_config.autoscaling_config.max_replicas == 3
    assert dep._deployment_config.max_ongoing_requests == 64
    assert dep.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.0}
    fixed = app_builder({"model": model_dir, "num_replicas": 2})._bound_deployment
    assert fixed._deployment_config.num_replicas == 2
    with pytest.raises(ConfigError, match="serve.num_replicas"):
        app_builder({"model": model_dir, "num_replicas": 0})
    with pytest.raises(ConfigError, match="min_replicas"):
        app_builder({"model": model_dir, "autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    # configs/deploy/serve.yaml is what `serve deploy` reads: Ray's own schema must accept it, and its args our builder.
    spec = yaml.safe_load((Path(__file__).parents[1] / "configs" / "deploy" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(spec) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(spec)
    (entry,) = schema.applications
    assert entry.import_path == "bigray.serve:app_builder"
    monkeypatch.setenv("BIGRAY_API_KEY", "k")
    deployed = app_builder({**entry.args, "model": model_dir})._bound_deployment
    assert deployed.init_args[1] == "k" and deployed._deployment_config.autoscaling_config.max_replicas == 4


def test_vllm_translation_matches_ray_serve_llm_schema(model_dir):
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig  # the class ray.serve.llm re-exports; needs no vLLM
    from ray.serve.schema import DeploymentSchema

    from bigray.serve.vllm import llm_config

    cfg = load_config(overrides=["serve.engine=vllm", "serve.model=s3://bucket/runs/r1/export", "serve.max_batch_size=64", "serve.dtype=bfloat16",
                                 "serve.autoscaling={min_replicas: 1, max_replicas: 4, target_ongoing_requests: 8}", "serve.accelerator_type=A10G",
                                 "serve.vllm={engine_kwargs: {gpu_memory_utilization: 0.8}, runtime_env: {env_vars: {A: b}}}"])
    kwargs = llm_config(cfg)
    assert kwargs == {
        "model_loading_config": {"model_id": "r1", "model_source": {"bucket_uri": "s3://bucket/runs/r1/export"}},
        "deployment_config": {"max_ongoing_requests": 64, "max_queued_requests": -1,
                              "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8.0}},
        "engine_kwargs": {"max_num_seqs": 64, "dtype": "bfloat16", "gpu_memory_utilization": 0.8},
        "accelerator_type": "A10G",
        "runtime_env": {"env_vars": {"A": "b"}},
    }
    llm = LLMConfig(**kwargs)
    assert llm.model_loading_config.model_source.bucket_uri == "s3://bucket/runs/r1/export"
    DeploymentSchema(name="x", **kwargs["deployment_config"])
    local = llm_config(load_config(overrides=["serve.engine=vllm", f"serve.model={model_dir}", "serve.num_replicas=2"]))
    assert LLMConfig(**local).model_loading_config.model_source == model_dir and local["deployment_config"]["num_replicas"] == 2
    with pytest.raises(ConfigError, match="api_key"):
        llm_config(load_config(overrides=["serve.engine=vllm", f"serve.model={model_dir}", "serve.api_key=k"]))


@pytest.mark.slow
def test_cli_serves_until_sigterm(model_dir, tmp_path):
    """`bigray serve` end to end in its own process and its own local Ray: answers, then exits 0 on SIGTERM."""
    import signal

    from openai import OpenAI

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bigray", "serve", f"serve.model={model_dir}", f"serve.port={port}", "ray.num_cpus=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                break
        assert f"http://127.0.0.1:{port}" in lines[-1], "".join(lines)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        name = client.models.list().data[0].id
        assert client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4).choices
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
