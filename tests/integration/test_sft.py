"""Chat fine-tuning end to end: a `datasets` dir of conversations -> bigray prepare (task sft) -> bigray train on a
pretrained dir built here -> export -> bigray serve, asked through the official `openai` client.

The pretrained dir is a `tiny` Llama (random init, saved with save_pretrained) with bigray's own BPE, so the chat
template is bigray's default on both sides: prepare renders the training conversations with it and serve renders
the request with it. The fine-tuned model must answer the trained questions with the trained answers and stop
(EOS learned as the end of the assistant turn): that holds only if the loss mask, the template and the packing
agree between prepare, training and serving.
"""

from __future__ import annotations

from bigray.config import load_config
from tests.conftest import free_port

CHATS = [("Capital of France?", "Paris."), ("Capital of Japan?", "Tokyo."), ("Colour of the sky?", "Blue."),
         ("Two plus two?", "Four."), ("Opposite of hot?", "Cold."), ("First letter?", "A."),
         ("Largest ocean?", "Pacific."), ("Say hello.", "Hello!")]


def pretrained_dir(path: str) -> str:
    """A tiny Llama and bigray's BPE (trained on the chats' words), saved like any HF model dir."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from bigray.config import ModelConfig
    from bigray.data.tokenizer import train_bpe
    from bigray.train.model import model_config

    texts = [f"user: {q}\nassistant: {a}\n" for q, a in CHATS] * 50
    train_bpe(texts, 512, path)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    LlamaForCausalLM(model_config(ModelConfig(preset="tiny"), len(tok), 128, tok.eos_token_id)).save_pretrained(path)
    return path


def test_sft_chat_end_to_end(ray_cluster, tmp_path):
    from datasets import Dataset
    from openai import OpenAI

    from bigray.data import prepare
    from bigray.serve import start, stop
    from bigray.train.trainer import train

    model = pretrained_dir(str(tmp_path / "pretrained"))
    records = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHATS]
    Dataset.from_list(records * 6).save_to_disk(str(tmp_path / "chats"))  # repeated: enough rows for a few batches
    cfg = load_config(overrides=[
        # data.tokenizer is the model dir itself: the usual SFT setup.
        "data.task=sft", f"data.inputs=['{tmp_path / 'chats'}']", f"data.tokenizer={model}", "data.dedup=none",
        f"data.output={tmp_path / 'data'}", "data.seq_len=64", "data.val_fraction=0.0", "data.block_rows=1",
        f"model.pretrained={model}", "train.num_workers=2", "train.micro_batch_size=2", "train.precision=fp32",
        "train.lr=3e-3", "train.min_lr=3e-3", "train.warmup_steps=0", "train.weight_decay=0.0", "train.max_steps=100",
        "train.log_every=10", "train.checkpoint_every=100", "train.max_failures=0",
        f"train.storage_path={tmp_path / 'runs'}", "train.run_name=sft",
    ])
    prepared = prepare(cfg)
    assert prepared.splits["train"].rows < len(records) * 6  # several conversations per row: packed
    out = train(cfg)
    losses = [r["loss"] for r in out.records if "loss" in r]
    assert losses[-1] < 0.5 and losses[-1] < losses[0] / 2, losses  # the mean over answer tokens: memorised

    url = start(load_config(overrides=[f"serve.model={out.export.out_dir}", f"serve.port={free_port()}",
                                       "serve.model_name=sft", "serve.num_cpus=1"]))
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        answers = [client.chat.completions.create(model="sft", messages=[{"role": "user", "content": q}],
                                                  max_tokens=12, temperature=0).choices[0] for q, _ in CHATS]
    finally:
        stop()
    right = [c.message.content.strip() == a and c.finish_reason == "stop" for c, (_, a) in zip(answers, CHATS)]
    assert sum(right) >= len(CHATS) - 1, [(c.message.content, c.finish_reason) for c in answers]

