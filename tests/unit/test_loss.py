"""The loss implementations against plain cross-entropy and HF's own loss: values, gradients, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigray.config import ModelConfig
from bigray.errors import ConfigError
from bigray.train.loss import IGNORE_INDEX, chunked_cross_entropy, final_hidden_states, lm_loss, resolve_loss_impl
from bigray.train.model import model_config
from tests.unit.memory_probe import run_probe


def tiny_model(vocab: int = 512, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(ModelConfig(preset="tiny"), vocab, 64, 0))


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_plain_is_hf_loss():
    model = tiny_model()
    rows = torch.randint(0, 512, (3, 33), generator=torch.Generator().manual_seed(1))
    ours = lm_loss(model, rows[:, :-1], rows[:, 1:], "plain")
    # HF shifts labels itself: the reference is independent of our input/label split.
    torch.testing.assert_close(ours, model(input_ids=rows, labels=rows).loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ignore", [False, True])
def test_chunked_matches_plain_values_and_gradients(ignore):
    model = tiny_model()
    rows = torch.randint(0, 512, (3, 33), generator=torch.Generator().manual_seed(2))
    labels = rows[:, 1:].clone()
    if ignore:
        labels[0, :7] = IGNORE_INDEX
        labels[2, -3:] = IGNORE_INDEX
    plain = lm_loss(model, rows[:, :-1], labels, "plain")
    plain.backward()
    want = grads(model)
    model.zero_grad()
    chunked = lm_loss(model, rows[:, :-1], labels, "chunked")
    chunked.backward()
    torch.testing.assert_close(chunked, plain, rtol=0, atol=1e-5)
    got = grads(model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("tokens_per_chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_any_chunk_size(tokens_per_chunk):
    """Uneven last chunks, one token per chunk and one chunk for all give F.cross_entropy's values and gradients."""
    gen = torch.Generator().manual_seed(3)
    lm_head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(100, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 300, (100,), generator=gen)
    want = F.cross_entropy(lm_head(hidden), labels)
    want_h, want_w = torch.autograd.grad(want, [hidden, lm_head.weight])
    got = chunked_cross_entropy(lm_head, hidden, labels, tokens_per_chunk)
    got_h, got_w = torch.autograd.grad(got, [hidden, lm_head.weight])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_h, want_h, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-5)


def test_final_hidden_states_are_the_decoder_output_and_no_logits():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(final_hidden_states(model, ids), model.model(input_ids=ids).last_hidden_state)


def test_resolve_loss_impl():
    assert resolve_loss_impl("auto", "cpu", 2) == "plain"
    assert resolve_loss_impl("chunked", "cpu", 3) == "chunked"
    assert resolve_loss_impl("auto", "cuda", 3) == "chunked"  # ZeRO-3: the path tested with a partitioned lm_head
    with pytest.raises(ConfigError, match="liger needs a CUDA device"):
        resolve_loss_impl("liger", "cpu", 2)


def loss_step_peak(impl: str, tokens: int, vocab: int, hidden: int) -> int:
    """Peak RSS growth (bytes) of one loss forward + backward from fp32 hidden states, in a fresh process."""
    code = f"""
import torch.nn.functional as F
from bigray.train.loss import chunked_cross_entropy
torch.set_num_threads(1)
torch.manual_seed(0)
lm_head = torch.nn.Linear({hidden}, {vocab}, bias=False)
hidden = torch.randn({tokens}, {hidden}, requires_grad=True)
labels = torch.randint(0, {vocab}, ({tokens},))
warm = torch.nn.Linear({hidden}, 8, bias=False)  # kernels and their workspaces, tiny
chunked_cross_entropy(warm, hidden[:4].detach().requires_grad_(), labels[:4] % 8).backward()
base = psutil.Process().memory_info().rss
reset_peak()
if "{impl}" == "plain":
    loss = F.cross_entropy(lm_head(hidden).float(), labels)
else:
    loss = chunked_cross_entropy(lm_head, hidden, labels)
loss.backward()
print(json.dumps(hwm() - base))
"""
    return run_probe(code)


def test_chunked_loss_peak_memory_falls_by_the_planned_factor():
    """Vocab 32k, seq 2048: plain peaks at 12 bytes per logit; chunked at one chunk's logits plus lm_head gradients.

    Hidden 256 keeps the lm_head (32 MiB) small next to the logits (256 MiB fp32), as at real model sizes.
    """
    from bigray.plan import loss_bytes

    tokens, vocab, hidden = 2048, 32768, 256
    plain, chunked = (loss_step_peak(impl, tokens, vocab, hidden) for impl in ("plain", "chunked"))
    want_plain = loss_bytes("plain", tokens, vocab, hidden, 4)
    # the lm_head gradient itself, which the planner counts with the other gradients, peaks with the chunked loss
    want_chunked = loss_bytes("chunked", tokens, vocab, hidden, 4) + 4 * vocab * hidden
    print(f"plain {plain / 2**20:.0f} MiB (planned {want_plain / 2**20:.0f}), "
          f"chunked {chunked / 2**20:.0f} MiB (planned {want_chunked / 2**20:.0f}), x{plain / chunked:.1f}")
    assert plain == pytest.approx(want_plain, rel=0.15)
    assert chunked == pytest.approx(want_chunked, rel=0.15)
    assert plain / chunked > 0.85 * want_plain / want_chunked > 6
