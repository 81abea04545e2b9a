"""SFT throughput with document-aware packing against one conversation per row padded to the longest in its batch.

The same conversations go through bigray's training step both ways (`bigray.train.loop.setup_engine` and
`lm_loss` on `Rows`: labels from the loss mask, per-document positions, the token-weighted normaliser), one
process, DeepSpeed ZeRO-0 on CPU, fp32:

- packed: conversations back to back in rows of seq_len + 1 tokens as `bigray prepare` packs them (whole, in
  order; one that does not fit opens the next row), `segment_ids` per conversation, padding its own segment;
- padded: `--micro-batch` conversations per micro step, right-padded to the longest of them (mask 0 on padding,
  no segment ids: plain causal attention, the padding comes after every real token).

Conversations: functions of Python's standard library as chat turns (user: the signature and docstring,
assistant: the source), rendered, masked and packed by bigray prepare's own functions (`bigray.data.sft`,
`bigray.data.pack`: bigray's default chat template, a byte-level BPE trained here, the loss mask on the
assistant turn and its EOS). Both modes walk the same shuffled conversation
order (no length grouping). Printed: real (non-padding) tokens/s, answer tokens/s, the padding fraction of each,
and the ratios, measured in alternating rounds in one run (median of `--rounds`).

    python benchmarks/sft.py [--seq-len 512 --micro-batch 8 --conversations 256 --preset tiny --rounds 3]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from bigray.config import load_config
from bigray.storage import Store
from bigray.train.batches import Rows

MODULES = ("json", "email", "logging", "argparse", "textwrap", "shutil", "tarfile", "zipfile", "pathlib",
           "statistics", "csv", "configparser", "difflib", "inspect", "asyncio", "http", "urllib", "xml")


def conversations(limit: int) -> list[tuple[str, str]]:
    """(user, assistant) pairs: a stdlib function's signature + docstring, and its source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    pairs = []
    for name in MODULES:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [root / f"{name}.py"]:
            source = file.read_text(encoding="utf-8", errors="replace")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.FunctionDef) and (doc := ast.get_docstring(node)):
                    args = ", ".join(a.arg for a in node.args.args)
                    pairs.append((f"Write {node.name}({args}): {doc}", ast.get_source_segment(source, node) or ""))
    order = np.random.default_rng(0).permutation(len(pairs))
    return [pairs[i] for i in order[:limit]]


def tokenize(pairs: list[tuple[str, str]], vocab: int, work: str) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """Token ids and loss masks per conversation as `bigray prepare` (data.task sft) makes them: bigray's BPE,
    bigray's default chat template (the assistant turn and its EOS are the targets), and the EOS id."""
    from tokenizers import Tokenizer

    from bigray.data.sft import chat_format, encode_pieces, render
    from bigray.data.tokenizer import EOS, train_bpe

    chats = [[{"role": "user", "content": u}, {"role": "assistant", "content": a}] for u, a in pairs]
    fmt = chat_format(None, None, {"eos_token": EOS, "bos_token": EOS, "pad_token": EOS}, "assistant", "messages")
    pieces = [render(chat, fmt) for chat in chats]
    train_bpe(("".join(text for text, _ in doc) for doc in pieces), vocab, work)
    tok = Tokenizer.from_file(os.path.join(work, "tokenizer.json"))
    encoded = encode_pieces(pieces, tok)
    return [np.array(ids, dtype=np.int64) for ids, _ in encoded], [mask for _, mask in encoded], tok.token_to_id(EOS)


def packed_rows(ids, masks, row_len: int, eos: int) -> tuple[Rows, np.ndarray]:
    """The conversations packed as prepare packs them (`pack_documents`: whole, in order, a conversation that does
    not fit opens the next row, the rest of a row padding with a segment of its own and mask 0); also returns the
    conversation (non-padding) tokens of each row."""
    from bigray.data.pack import pack_documents, place_documents

    lengths = np.array([len(d) for d in ids])
    tokens, mask, segments, _ = pack_documents(np.concatenate(ids), np.concatenate(masks), lengths, row_len, eos)
    row, _ = place_documents(lengths, row_len)
    real = np.bincount(row, weights=lengths, minlength=len(tokens)).astype(np.int64)
    return Rows(tokens=tokens.astype(np.int64), loss_mask=mask, segment_ids=segments,
                row_ids=np.arange(len(tokens))), real


def padded_batches(ids, masks, micro: int, eos: int) -> list[Rows]:
    """`micro` conversations per batch, right-padded to the longest of them (mask 0 on the padding)."""
    out = []
    for start in range(0, len(ids), micro):
        docs, doc_masks = ids[start:start + micro], masks[start:start + micro]
        width = max(len(d) for d in docs)
        tokens = np.full((len(docs), width), eos, dtype=np.int64)
        mask = np.zeros_like(tokens, dtype=np.uint8)
        for r, (d, m) in enumerate(zip(docs, doc_masks)):
            tokens[r, :len(d)], mask[r, :len(d)] = d, m
        out.append(Rows(tokens=tokens, loss_mask=mask, row_ids=np.arange(start, start + len(docs))))
    return out


def run_epoch(engine, batches: list[Rows], warmup: int) -> float:
    """Seconds for batches[warmup:], one optimizer step each (forward, backward, AdamW), as train_step runs it."""
    import torch

    from bigray.train.loop import lm_loss
    from bigray.train.loss import count_targets

    for i, rows in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        normalizer = max(1, count_targets(rows.tokens, rows.loss_mask, rows.segment_ids))
        loss = lm_loss(engine, rows, torch.device("cpu"), "plain", normalizer)
        engine.backward(loss)
        engine.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch

    from bigray.train.loop import setup_engine

    torch.set_num_threads(args.threads)
    row_len = args.seq_len + 1
    ids, masks, eos = tokenize(conversations(10 * args.conversations), args.vocab,
                               tempfile.mkdtemp(prefix="bigray-bench-sft-"))
    keep = [i for i, d in enumerate(ids) if len(d) <= row_len][:args.conversations]  # the same set both ways
    ids, masks = [ids[i] for i in keep], [masks[i] for i in keep]
    real_tokens = sum(len(d) for d in ids)
    packed, packed_real = packed_rows(ids, masks, row_len, eos)
    lengths = np.array([len(d) for d in ids])
    modes = {"packed": [packed.slice(i, i + args.micro_batch) for i in range(0, len(packed), args.micro_batch)],
             "padded": padded_batches(ids, masks, args.micro_batch, eos)}
    warmup = 2
    # The tokens the timed batches hold: real ones from the conversations, the rest padding.
    timed_real = {m: int(sum(lengths[r.row_ids].sum() if m == "padded" else packed_real[r.row_ids].sum()
                             for r in b[warmup:])) for m, b in modes.items()}
    timed_slots = {m: sum(r.tokens.size for r in b[warmup:]) for m, b in modes.items()}
    timed_targets = {m: sum(_targets(r) for r in b[warmup:]) for m, b in modes.items()}

    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    cfg = load_config(overrides=[f"model.preset={args.preset}", "train.num_workers=1", "train.zero_stage=0",
                                 "train.precision=fp32", f"train.micro_batch_size={args.micro_batch}",
                                 "train.warmup_steps=0", "train.lr=1e-4", "train.min_lr=1e-4"])
    engine, _, _ = setup_engine(cfg.train, cfg.model, Store(cfg.storage), args.vocab, args.seq_len, eos, 1,
                                torch.device("cpu"))
    seconds = {m: [] for m in modes}
    for _ in range(args.rounds):  # alternating, so both modes see the same load on a shared box
        for mode, batches in modes.items():
            seconds[mode].append(run_epoch(engine, batches, warmup))
    result = {"conversations": len(ids), "conversation_tokens": real_tokens, "seq_len": args.seq_len,
              "micro_batch": args.micro_batch, "preset": args.preset, "threads": args.threads}
    for mode in modes:
        s = statistics.median(seconds[mode])
        result[mode] = {"steps": len(modes[mode]) - warmup, "seconds": round(s, 2),
                        "tokens_per_s": round(timed_real[mode] / s, 1),
                        "target_tokens_per_s": round(timed_targets[mode] / s, 1),
                        "padding_fraction": round(1 - timed_real[mode] / timed_slots[mode], 4),
                        "rounds_s": [round(x, 2) for x in seconds[mode]]}
    p, q = result["packed"], result["padded"]
    pad_packed = timed_slots["packed"] - timed_real["packed"]
    pad_padded = timed_slots["padded"] - timed_real["padded"]
    result["packed_over_padded_tokens_per_s"] = round(p["tokens_per_s"] / q["tokens_per_s"], 2)
    result["packed_over_padded_target_tokens_per_s"] = round(p["target_tokens_per_s"] / q["target_tokens_per_s"], 2)
    # per real token processed, how much less padding packing computes on
    result["padding_avoided"] = round(1 - (pad_packed / timed_real["packed"]) / (pad_padded / timed_real["padded"]), 4)
    print(json.dumps(result, indent=2))
    torch.distributed.destroy_process_group()


def _targets(rows: Rows) -> int:
    from bigray.train.loss import count_targets

    return count_targets(rows.tokens, rows.loss_mask, rows.segment_ids)


if __name__ == "__main__":
    main()
