"""SFT rows: labels from loss_mask and segment_ids, per-document positions, and attention that never crosses a
packed document, checked against each document run alone through the HF model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bigray.config import ModelConfig
from bigray.train.loss import IGNORE_INDEX, lm_loss, segment_positions, shift_rows, target_mask
from bigray.train.model import model_config

VOCAB = 512
DOC_LENGTHS = (5, 9, 1, 4)  # a one-token document too: its only prediction crosses a boundary
PAD = 3  # trailing padding: its own segment, mask 0


def tiny_model(attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = model_config(ModelConfig(preset="tiny"), VOCAB, 64, 0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32).eval()


def packed_row(lengths=DOC_LENGTHS, pad=PAD, seed=0):
    """(tokens, loss_mask, segment_ids, docs) of one packed row: documents back to back, then padding."""
    gen = np.random.default_rng(seed)
    docs = [gen.integers(1, VOCAB, n) for n in lengths]
    tokens = np.concatenate(docs + [np.zeros(pad, dtype=np.int64)])
    segments = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)] + [np.full(pad, len(lengths))])
    # a prompt/answer split inside each document: its first half is prompt (mask 0)
    mask = np.concatenate([(np.arange(n) >= n // 2).astype(np.uint8) for n in lengths] + [np.zeros(pad, np.uint8)])
    return tokens, mask, segments.astype(np.int32), docs


def test_segment_positions_restart_at_every_document():
    segments = np.array([[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(segment_positions(segments), [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_labels_are_masked_on_non_targets_and_across_documents():
    tokens = np.array([[10, 11, 12, 13, 14, 15, 0, 0]])
    mask = np.array([[0, 0, 1, 1, 0, 1, 0, 0]], np.uint8)  # mask[i]: is token i a training target
    segments = np.array([[0, 0, 0, 0, 1, 1, 2, 2]], np.int32)
    shifted = shift_rows(tokens, mask, segments)
    np.testing.assert_array_equal(shifted.input_ids, [[10, 11, 12, 13, 14, 15, 0]])
    # targets 11..0: 11 masked, 12 and 13 kept, 14 masked, 15 kept (same document as 14), 0s are padding
    np.testing.assert_array_equal(shifted.labels, [[-100, 12, 13, -100, 15, -100, -100]])
    np.testing.assert_array_equal(shifted.position_ids, [[0, 1, 2, 3, 0, 1, 0]])
    # a boundary whose target token is masked in: still no prediction across documents
    mask[0, 4] = 1
    assert not target_mask(tokens, mask, segments)[0, 3]
    # pretraining rows: plain shift, no positions
    plain = shift_rows(tokens)
    np.testing.assert_array_equal(plain.labels, tokens[:, 1:])
    assert plain.position_ids is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_document_alone(attn):
    model = tiny_model(attn)
    tokens, mask, segments, docs = packed_row()
    other, _, other_segments, other_docs = packed_row((12, 7, 3), pad=0, seed=1)  # a second row, packed otherwise
    batch = shift_rows(np.stack([tokens, other]), None, np.stack([segments, other_segments]))
    with torch.no_grad():  # use_cache=False as in training: with a cache transformers ignores packing
        packed = model(input_ids=torch.from_numpy(batch.input_ids), position_ids=torch.from_numpy(batch.position_ids),
                       use_cache=False).logits
        unmasked = model(input_ids=torch.from_numpy(batch.input_ids), use_cache=False).logits
    for row, row_docs in enumerate((docs, other_docs)):
        start = 0
        for doc in row_docs:
            n = min(len(doc), batch.input_ids.shape[1] - start)  # the last document of row 2 lost its last token
            with torch.no_grad():
                alone = model(input_ids=torch.from_numpy(doc[None, :n])).logits[0]
            torch.testing.assert_close(packed[row, start:start + n], alone, rtol=0, atol=1e-5)
            if start:  # without the positions a later document sees the earlier ones: the check above can fail
                assert not torch.allclose(unmasked[row, start:start + n], alone, atol=1e-3)
            start += n


def test_packed_loss_is_the_token_weighted_mean_of_the_documents_alone():
    model = tiny_model()
    tokens, mask, segments, docs = packed_row()
    batch = shift_rows(tokens[None], mask[None], segments[None])
    with torch.no_grad():
        packed = lm_loss(model, torch.from_numpy(batch.input_ids), torch.from_numpy(batch.labels), "plain",
                         position_ids=torch.from_numpy(batch.position_ids))
    total, count, start = 0.0, 0, 0
    for doc in docs:
        alone = shift_rows(doc[None], mask[None, start:start + len(doc)])
        n = int((alone.labels != IGNORE_INDEX).sum())
        if n:
            with torch.no_grad():
                total += n * lm_loss(model, torch.from_numpy(alone.input_ids), torch.from_numpy(alone.labels),
                                     "plain").item()
        count, start = count + n, start + len(doc)
    assert count == int((batch.labels != IGNORE_INDEX).sum())
    assert packed.item() == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_masked_tokens_get_no_gradient(impl):
    """The loss's gradient on the logits of masked positions is exactly zero, and the implementations agree."""
    model = tiny_model()
    tokens, mask, segments, _ = packed_row()
    batch = shift_rows(tokens[None], mask[None], segments[None])
    logits = []
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out) or out.retain_grad())
    loss = lm_loss(model, torch.from_numpy(batch.input_ids), torch.from_numpy(batch.labels), impl,
                   position_ids=torch.from_numpy(batch.position_ids))
    loss.backward()
    handle.remove()
    # chunked: one lm_head call per chunk, and again in backward (the recompute, whose outputs get the gradients)
    grad = torch.cat([out.grad.reshape(-1, VOCAB) for out in logits if out.grad is not None])
    assert grad.shape[0] == batch.labels.size
    counted = torch.from_numpy(batch.labels.reshape(-1) != IGNORE_INDEX)
    assert counted.any() and (~counted).any()
    assert torch.equal(grad[~counted], torch.zeros_like(grad[~counted]))
    assert (grad[counted].abs().sum(-1) > 0).all()


def test_normalizer_divides_the_summed_loss():
    """Every implementation returns sum / normalizer: what a token-weighted mean over micro steps needs."""
    model = tiny_model()
    tokens, mask, segments, _ = packed_row()
    batch = shift_rows(tokens[None], mask[None], segments[None])
    args = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.labels)
    kwargs = dict(position_ids=torch.from_numpy(batch.position_ids))
    n = int((batch.labels != IGNORE_INDEX).sum())
    with torch.no_grad():
        mean = lm_loss(model, *args, "plain", **kwargs)
        for impl in ("plain", "chunked"):
            summed = lm_loss(model, *args, impl, normalizer=1.0, **kwargs)
            assert summed.item() == pytest.approx(mean.item() * n, rel=1e-5)


def test_flash_attention_gets_one_padding_free_row_with_document_boundaries():
    """flash-attention reads documents from positions in a batch of one row: the flattened rows' cu_seqlens
    (transformers' own function) fall exactly on every document and row boundary."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    tokens, _, segments, _ = packed_row()
    other, _, other_segments, _ = packed_row((12, 7, 3), pad=0, seed=1)
    batch = shift_rows(np.stack([tokens, other]), None, np.stack([segments, other_segments]))
    (cu_q, _), (max_q, _) = prepare_fa_kwargs_from_position_ids(torch.from_numpy(batch.position_ids).reshape(1, -1))
    row = batch.input_ids.shape[1]
    want = np.cumsum([0, *DOC_LENGTHS, PAD - 1, 12, 7, 3 - 1])  # the inputs drop each row's last token
    assert want[len(DOC_LENGTHS) + 1] == row
    np.testing.assert_array_equal(cu_q.numpy(), want)
    assert max_q == 12


def test_accumulated_micro_losses_give_the_token_weighted_mean_gradient():
    """train_step's scaling: micro losses divided by `loss_normalizer`, then by grad_accum (as DeepSpeed does), add up
    to the gradient of the mean over every counted label of the global batch, not to a mean of per-micro means."""
    import torch.distributed as dist

    from bigray.runtime import free_port
    from bigray.train.batches import Rows, micro_slice
    from bigray.train.loop import loss_normalizer

    rows_a, mask_a, seg_a, _ = packed_row()
    rows_b, mask_b, seg_b, _ = packed_row((12, 7, 3), pad=0, seed=1)
    mask_b[:] = 1  # the second micro batch: many more targets than the first
    rows = Rows(tokens=np.stack([rows_a, rows_b]), loss_mask=np.stack([mask_a, mask_b]),
                segment_ids=np.stack([seg_a, seg_b]), row_ids=np.arange(2))
    run = SimpleNamespace(train=SimpleNamespace(micro_batch_size=1, grad_accum_steps=2), world=1,
                          device=torch.device("cpu"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        normalizer = loss_normalizer(rows, run)
    finally:
        dist.destroy_process_group()

    def grads_of(losses_fn):
        model = tiny_model()
        losses_fn(model)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def batch_loss(model, r: Rows, normalizer=None):
        s = shift_rows(r.tokens, r.loss_mask, r.segment_ids)
        return lm_loss(model, torch.from_numpy(s.input_ids), torch.from_numpy(s.labels), "plain",
                       position_ids=torch.from_numpy(s.position_ids), normalizer=normalizer)

    accumulated = grads_of(lambda model: [(batch_loss(model, micro_slice(rows, m, 1), normalizer) / 2).backward()
                                          for m in range(2)])
    whole = grads_of(lambda model: batch_loss(model, rows).backward())
    per_micro_means = grads_of(lambda model: [(batch_loss(model, micro_slice(rows, m, 1)) / 2).backward()
                                              for m in range(2)])
    torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(per_micro_means, whole, rtol=1e-2, atol=1e-4)
