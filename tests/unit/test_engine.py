"""The serving engine without Ray: parity with HF `generate`, chunked prefill, KV budget, failure isolation,
health, back-pressure, vectorised sampling and incremental detokenization, on a random-init `tiny` Llama."""

from __future__ import annotations

import asyncio
import sysconfig
import threading
import time
from pathlib import Path

import pytest

from bigray.serve.engine import Engine, Overloaded, SamplingParams, Unhealthy, _OffsetDecoder, sample

CONTEXT = 96


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
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-engine") / "export"))


@pytest.fixture(scope="module")
def reference(model_dir):
    """HF's own greedy `generate` on the same dir: token ids after the prompt, EOS excluded."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    eos = model.config.eos_token_id

    def greedy(ids: list[int], max_tokens: int) -> list[int]:
        t = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=max_tokens, pad_token_id=eos
            )
        new = out[0, len(ids) :].tolist()
        return new[: new.index(eos)] if eos in new else new

    return greedy


def engine(model_dir: str, **kw) -> Engine:
    return Engine(model_dir, device="cpu", num_threads=1, batch_wait_timeout_s=0.0, **kw)


def prompts(e: Engine, n: int) -> list[list[int]]:
    """Prompts of very different lengths (4..~70 tokens), so rows are padded and chunks split them."""
    return [e.encode(f"def f_{i}(x):" + " return x +" * (i * 3)) for i in range(n)]


async def collect(e: Engine, items, **kw) -> tuple[list[list[int]], list[str], list[str | None], list[str | None]]:
    ids, texts, finish, errors = [[] for _ in items], [""] * len(items), [None] * len(items), [None] * len(items)
    async for i, ev in e.generate(items, **kw):
        ids[i] += ev.token_ids
        texts[i] += ev.text
        finish[i], errors[i] = ev.finish_reason, ev.error or errors[i]
    return ids, texts, finish, errors


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def without_eos(e: Engine, ids: list[int]) -> list[int]:
    return [t for t in ids if t not in e.eos_ids]


def test_chunked_prefill_matches_generate_and_keeps_one_logits_row(model_dir, reference):
    e = engine(model_dir, prefill_chunk_tokens=16)
    shapes = []
    forward = e.model.forward

    def recording(*args, **kw):
        out = forward(*args, **kw)
        shapes.append((tuple(kw["input_ids"].shape), tuple(out.logits.shape)))
        return out

    e.model.forward = recording
    groups = []
    admit = e._admit

    def recording_admit():
        admit()
        if e._prefill is not None:
            groups.append((tuple(e._prefill.ids.shape), sum(len(s.prompt) for s in e._prefill.seqs)))

    e._admit = recording_admit
    ps = prompts(e, 6)
    ids, _, _, errors = asyncio.run(collect(e, [(p, greedy(10)) for p in ps]))
    assert errors == [None] * 6
    assert [without_eos(e, x) for x in ids] == [reference(p, 10) for p in ps]
    prefill = [(i, lg) for i, lg in shapes if i[1] > 1]
    # At most 16 padded prompt tokens per step: the longest prompt is prefilled over several steps.
    assert all(i[0] * i[1] <= 16 for i, _ in prefill) and len(prefill) >= max(map(len, ps)) // 16
    assert all(lg[1] == 1 for _, lg in prefill)  # logits_to_keep=1: never [rows, cols, vocab]
    # One long prompt then five short ones: the short ones are not all padded to the long one's length.
    groups.clear()
    skewed = [ps[-1]] + [ps[0]] * 5
    ids, _, _, errors = asyncio.run(collect(e, [(p, greedy(10)) for p in skewed]))
    assert errors == [None] * 6 and [without_eos(e, x) for x in ids] == [reference(p, 10) for p in skewed]
    assert len(groups) > 1 and all(rows * width <= 2 * real for (rows, width), real in groups), groups


def test_join_and_leave_copy_only_their_own_rows(model_dir, reference):
    """Sequences of different lengths join and leave a running batch: outputs match `generate`, the cache's
    storage is never reallocated, and each join or leave copies at most one row."""
    e = engine(model_dir)
    ps = [e.encode(f"def f_{i}(x):" + " return x +" * i) for i in range(6)]  # 7..25 tokens
    lengths = [20, 3, 12, 6, 16, 9]  # rows leave at different steps, holes open in the middle of the batch
    storage = set()
    step = e.step

    def recording():
        step()
        if e._kv is not None:
            storage.add(e._kv.layers[0].keys.data_ptr())

    e.step = recording
    forward = e.model.forward
    e.model.forward = lambda *a, **kw: (time.sleep(0.01), forward(*a, **kw))[1]  # rows overlap on any machine

    async def run():
        tasks = []
        for i, (p, n) in enumerate(zip(ps, lengths)):
            tasks.append(asyncio.ensure_future(collect(e, [(p, greedy(n))])))
            await asyncio.sleep(0.03 * (i % 3))  # some arrive together, some while others decode
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    for (ids, _, _, errors), p, n in zip(results, ps, lengths):
        assert errors == [None] and without_eos(e, ids[0]) == reference(p, n)
    kv = e._kv
    assert kv.grown == 0 and len(storage) == 1  # one allocation (64 columns fit every row here), never replaced
    # Each sequence's prefill is copied into its slot once; a leave moves at most one surviving row into its hole.
    assert len(ps) < kv.rows_copied <= 2 * len(ps) and e.stats["max_batch_seen"] >= 3


def test_metrics_get_every_token_but_gauges_only_twice_a_second(model_dir):
    """Histograms see every token; the occupancy gauges and the token counter are batched (Ray exports every few
    seconds), and an engine going idle reports at once, so a scrape never misses tokens."""
    from bigray.serve.metrics import EngineMetrics

    class Recording(EngineMetrics):
        def __init__(self):
            self.ttft, self.itl, self.tokens, self.loads = 0, 0, 0, []

        def first_token(self, seconds):
            self.ttft += 1

        def inter_token(self, seconds):
            self.itl += 1

        def generated(self, tokens):
            self.tokens += tokens

        def load(self, waiting, running, kv_tokens):
            self.loads.append(running)

    m = Recording()
    e = engine(model_dir, metrics=m)
    ids, *_ = asyncio.run(collect(e, [(p, greedy(30)) for p in prompts(e, 3)]))
    generated = sum(len(x) for x in ids)
    for _ in range(100):  # the engine thread reports as it goes idle, just after the last event
        if m.tokens == generated:
            break
        time.sleep(0.02)
    assert m.ttft == 3 and m.ttft + m.itl == generated == m.tokens == e.stats["generated_tokens"]
    assert m.loads[-1] == 0 and len(m.loads) < e.stats["steps"] / 4


def test_kv_budget_admits_what_fits_and_queues_the_rest(model_dir, reference):
    e = engine(model_dir)
    ps = prompts(e, 4)
    budget = max(len(p) for p in ps) * 2 + 2 * 8
    e = engine(model_dir, kv_token_budget=budget)
    running = []
    step = e.step

    def recording():
        step()
        running.append(e.load()["kv_tokens_reserved"])

    e.step = recording
    ids, _, _, errors = asyncio.run(collect(e, [(p, greedy(8)) for p in ps]))
    assert errors == [None] * 4 and [without_eos(e, x) for x in ids] == [reference(p, 8) for p in ps]
    assert max(running) <= budget and e.stats["max_batch_seen"] < 4
    with pytest.raises(ValueError, match="KV budget"):
        asyncio.run(collect(e, [(ps[0], greedy(budget))]))


def test_a_failed_step_fails_only_the_newest_work(model_dir, reference):
    """An OOM in a decode with three rows fails the newest row; one in a prefill fails only that prefill."""
    e = engine(model_dir)
    ps = prompts(e, 4)
    forward = e.model.forward
    injected = {"decode": False, "prefill": False}

    def flaky(*args, **kw):
        rows, cols = kw["input_ids"].shape
        if cols == 1 and rows == 3 and not injected["decode"]:
            injected["decode"] = True
            forward(*args, **kw)  # the cache has grown in every layer before the failure
            raise RuntimeError("CUDA out of memory (injected)")
        if cols > 1 and kw["input_ids"].tolist()[0][-cols:] == ps[3][-cols:] and not injected["prefill"]:
            injected["prefill"] = True
            raise RuntimeError("out of memory (injected)")
        time.sleep(0.02)  # slow enough that the later requests arrive while the first two decode
        return forward(*args, **kw)

    e.model.forward = flaky

    async def run():
        first = asyncio.ensure_future(collect(e, [(ps[0], greedy(40)), (ps[1], greedy(40))]))
        await asyncio.sleep(0.2)
        third = asyncio.ensure_future(collect(e, [(ps[2], greedy(12))]))
        await asyncio.sleep(0.3)
        fourth = asyncio.ensure_future(collect(e, [(ps[3], greedy(12))]))
        return await first, await third, await fourth, e.health()

    (ids, _, _, errors), (_, _, finish3, errors3), (_, _, finish4, errors4), health = asyncio.run(run())
    assert injected == {"decode": True, "prefill": True}
    assert errors == [None, None] and [without_eos(e, x) for x in ids] == [reference(p, 40) for p in ps[:2]]
    assert finish3 == ["error"] and "out of memory" in errors3[0]
    assert finish4 == ["error"] and "out of memory" in errors4[0]
    assert e.stats["failed_steps"] == 2 and health is None  # not in a row: still healthy
    again, *_ = asyncio.run(collect(e, [(ps[2], greedy(12))]))
    assert without_eos(e, again[0]) == reference(ps[2], 12)


def test_health_fails_on_repeated_failures_a_hung_step_and_a_dead_loop(model_dir):
    e = engine(model_dir, max_consecutive_failures=2, step_timeout_s=0.2)
    assert e.health() is None
    forward = e.model.forward
    e.model.forward = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))

    async def failing():
        for _ in range(2):
            _, _, finish, _ = await collect(e, [(e.encode("x = 1"), greedy(4))])
            assert finish == ["error"]
        return e.health()

    problem = asyncio.run(failing())
    assert "2 engine steps failed in a row" in problem and "illegal memory access" in problem

    e = engine(model_dir, step_timeout_s=0.2)
    release = threading.Event()
    e.model.forward = lambda *a, **kw: (release.wait(5), forward(*a, **kw))[1]
    seen = []

    async def hung():
        task = asyncio.ensure_future(collect(e, [(e.encode("x = 1"), greedy(2))]))
        for _ in range(200):  # until the step is inside the (blocked) forward, however loaded the machine
            if e._step_started is not None:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.4)
        seen.append(e.health())
        release.set()
        await task
        seen.append(e.health())

    asyncio.run(hung())
    assert "engine step has run for" in seen[0] and seen[1] is None

    async def killed():
        await collect(e, [(e.encode("x = 1"), greedy(2))])

        def crash():  # a bug outside the guarded forward passes: the engine thread dies
            raise RuntimeError("engine bug (injected)")

        e.step = crash
        _, _, finish, errors = await collect(e, [(e.encode("x = 1"), greedy(2))])
        assert finish == ["error"] and "loop stopped" in errors[0]  # the request in flight hears it at once
        assert "loop stopped" in e.health() and "engine bug" in e.health()
        with pytest.raises(Unhealthy):
            await collect(e, [(e.encode("x = 1"), greedy(2))])

    asyncio.run(killed())

    e = engine(model_dir)
    asyncio.run(collect(e, [(e.encode("x = 1"), greedy(2))]))
    e.close()  # the thread ends (a benchmark making many engines does not keep them all alive)
    e._thread.join(10)
    assert not e._thread.is_alive() and "loop stopped" in e.health()


def test_full_waiting_queue_refuses_and_timeout_frees_rows(model_dir):
    e = engine(model_dir, max_waiting=2)
    with pytest.raises(Overloaded):
        asyncio.run(collect(e, [(e.encode("x"), greedy(2))] * 3))
    assert e.stats["overloaded"] == 1 and e.load()["waiting"] == 0

    e = engine(model_dir)
    forward = e.model.forward
    e.model.forward = lambda *a, **kw: (time.sleep(0.05), forward(*a, **kw))[1]

    async def late():
        with pytest.raises(TimeoutError):
            await collect(e, [(e.encode("x"), greedy(60))], timeout_s=0.3)
        for _ in range(100):
            if not e.load()["running"]:
                break
            await asyncio.sleep(0.05)
        return e.load()

    assert asyncio.run(late())["running"] == 0 and e.stats["cancelled"] == 1


def test_stop_strings_streamed_in_pieces_match_the_cut_text(model_dir, reference):
    e = engine(model_dir)
    p = e.encode("for key, value in")
    full = e.tokenizer.decode(reference(p, 20))
    stop = full[5:8]
    _, texts, finish, _ = asyncio.run(collect(e, [(p, greedy(20, stop=(stop, "never appears")))]))
    assert texts == [full[: full.find(stop)]] and finish == ["stop"]


def test_a_non_streamed_sequence_gets_one_event_with_what_the_stream_had(model_dir):
    import dataclasses

    e = engine(model_dir)
    ps = prompts(e, 3)
    stop = e.tokenizer.decode(e.encode(" return"))
    streamed = [(p, greedy(24, stop=(stop,) if i == 1 else (), logprobs=2, seed=i)) for i, p in enumerate(ps)]
    whole = [(p, dataclasses.replace(params, stream=False)) for p, params in streamed]

    async def events(items):
        return [(i, ev) async for i, ev in e.generate(items)]

    a, b = asyncio.run(events(streamed)), asyncio.run(events(whole))
    assert sorted(i for i, _ in b) == [0, 1, 2]  # one event per sequence, its last
    for i, ev in b:
        mine = [x for j, x in a if j == i]
        assert len(mine) > 1
        assert ev.text == "".join(x.text for x in mine)
        assert ev.token_ids == [t for x in mine for t in x.token_ids]
        assert ev.logprobs == [lp for x in mine for lp in x.logprobs] and len(ev.logprobs) == len(ev.token_ids)
        assert (ev.finish_reason, ev.completion_tokens) == (mine[-1].finish_reason, mine[-1].completion_tokens)


def test_vectorised_sampling():
    import torch

    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    params = [
        SamplingParams(1, temperature=0),
        SamplingParams(1, temperature=1.0, top_k=1),
        SamplingParams(1, temperature=1.0, top_p=1e-6),
        SamplingParams(1, temperature=1.0, top_k=3),
        SamplingParams(1, temperature=0.7, seed=1),
        SamplingParams(1, temperature=1.5),
    ]
    tokens = sample(logits, params, gens)
    best = logits.argmax(-1)
    assert tokens[:3].tolist() == best[:3].tolist()
    assert tokens[3] in logits[3].topk(3).indices
    # A row's draw depends only on its own generator: alone or in a batch, the same token.
    alone = sample(logits[4:5], params[4:5], [torch.Generator().manual_seed(4)])
    assert alone.tolist() == tokens[4:5].tolist()
    # And its frequencies follow softmax(logits / T) restricted to the top k.
    counts = torch.zeros(50)
    g = torch.Generator().manual_seed(0)
    for _ in range(3000):
        counts[sample(logits[3:4], params[3:4], [g])[0]] += 1
    top = logits[3].topk(3)
    expected = top.values.softmax(-1)
    assert torch.allclose(counts[top.indices] / 3000, expected, atol=0.04) and counts.sum() == counts[top.indices].sum()


def test_incremental_detokenization_equals_full_decode(model_dir):
    import random

    e = engine(model_dir)
    text = "héllo wörld ✓ 日本語 — naïve café\n\tdef f(x): return x  # ünïcödé"
    rng = random.Random(0)
    sequences = [e.encode(text), [rng.randrange(len(e.tokenizer)) for _ in range(200)]]
    for ids in sequences:
        for decoder in (e._decoder(), _OffsetDecoder(e._decode)):
            pieces = [decoder.step(t) for t in ids]
            streamed = "".join(p for p in pieces if p)
            full = e._decode(ids)
            # Only a trailing incomplete character may still be held back.
            assert full.startswith(streamed) and len(full) - len(streamed) <= 1, (
                type(decoder),
                streamed[-20:],
                full[-20:],
            )
    assert "".join(p or "" for p in map(e._decoder().step, sequences[0])) == text


def test_pickle_weights_are_refused(tmp_path, model_dir):
    import os
    import shutil

    import torch
    from safetensors.torch import load_file

    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(model_dir, name), tmp_path / name)
    torch.save(load_file(os.path.join(model_dir, "model.safetensors")), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        Engine(str(tmp_path))
