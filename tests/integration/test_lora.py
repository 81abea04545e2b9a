"""LoRA (`train.lora`) on real Ray Train + DeepSpeed ZeRO (CPU, gloo, 2 workers), a tiny pretrained Llama built here.

Checked against independent references: the base dir's own tensors (safetensors), peft's adapter file read with
safetensors (merged weight = base + alpha/r * B @ A), DeepSpeed's checkpoint files, HF `generate` on the merged
export against what `bigray serve` answers for the adapter dir through the `openai` client.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from bigray.storage import Store, join
from tests.conftest import free_port
from tests.integration.test_train import hf_logits_match_probe, metrics_of, run_cfg

STORE = Store()
LORA = ["train.lora.r=4", "train.lora.alpha=8", "train.lora.dropout=0.0"]


def build_base(path: str) -> str:
    """A tiny Llama whose vocab covers the `shards` tokenizer (512), saved as a pretrained HF dir."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=128, max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def tensors(model_dir: str, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, name))


def checkpoint_holds_only_adapters(checkpoint: str, base_dir: str) -> None:
    """DeepSpeed's files name only LoRA parameters and weigh less than the base model alone."""
    ds = os.path.join(checkpoint, "ds")
    names, size = set(), 0
    for f in os.listdir(ds):
        size += os.path.getsize(os.path.join(ds, f))
        if f.endswith("model_states.pt"):
            states = torch.load(os.path.join(ds, f), map_location="cpu", weights_only=False)
            names |= set(states["module"])
            names |= {n for group in states.get("param_shapes") or [] for n in group}
            assert not states.get("frozen_param_shapes"), "frozen base weights must not be saved"
    assert names and all(".lora_" in n for n in names), sorted(names)[:5]
    # A full fine-tuning checkpoint holds fp32 weights plus two Adam moments: over 3x the base.
    assert size < os.path.getsize(os.path.join(base_dir, "model.safetensors")), size


def merged_is_base_plus_adapter(merged_dir: str, adapter_dir: str, base_dir: str, scale: float) -> None:
    """Untargeted weights are the base's, bit for bit; each targeted one is base + scale * B @ A from peft's file."""
    base, merged = tensors(base_dir, "model.safetensors"), tensors(merged_dir, "model.safetensors")
    adapter = tensors(adapter_dir, "adapter_model.safetensors")
    prefix = "base_model.model."
    targeted = {k[len(prefix):].replace(".lora_A.weight", ".weight") for k in adapter if ".lora_A." in k}
    assert len(targeted) == 2 * 7, targeted  # all-linear: q k v o gate up down in each of 2 layers
    assert set(merged) == set(base)
    moved = 0.0
    for name, weight in base.items():
        if name in targeted:
            stem = prefix + name.removesuffix(".weight")
            delta = scale * adapter[f"{stem}.lora_B.weight"] @ adapter[f"{stem}.lora_A.weight"]
            torch.testing.assert_close(merged[name], weight + delta, atol=1e-5, rtol=1e-5)
            moved = max(moved, delta.abs().max().item())
        else:
            assert torch.equal(merged[name], weight), f"{name}: a frozen base weight changed"
    assert moved > 1e-4, "training must have moved the adapters off B = 0"


def test_lora_zero3_trains_only_adapters_exports_merged_and_adapter_and_serves_it(shards, ray_cluster, tmp_path):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bigray.config import load_config
    from bigray.serve import start, stop
    from bigray.train.export import committed_checkpoint, export
    from bigray.train.trainer import train

    base_dir = build_base(str(tmp_path / "base"))
    out = train(run_cfg(shards, str(tmp_path / "runs"), "lora3", f"model.pretrained={base_dir}", *LORA,
                        "train.zero_stage=3", "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6"))
    assert metrics_of(out.run_dir)[-1]["step"] == 6
    checkpoint_holds_only_adapters(committed_checkpoint(out.run_dir, STORE), base_dir)

    # The end-of-run export merged the adapters; HF loads it as a plain Llama matching the engine's probe logits.
    assert out.export.merge_max_abs_diff < 1e-4 and not out.export.adapter_only
    hf_logits_match_probe(out.export.out_dir, out.run_dir)
    adapter_dir = str(tmp_path / "adapter")
    result = export(out.run_dir, adapter_dir, STORE, adapter_only=True)
    assert result.adapter_only and result.probe_max_abs_diff < 1e-4
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(adapter_dir))
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == base_dir
    merged_is_base_plus_adapter(out.export.out_dir, adapter_dir, base_dir, scale=8 / 4)

    # `bigray serve` of the adapter dir: the base from adapter_config, the adapter merged at load; greedy text equals
    # HF's own generate on the merged export.
    url = start(load_config(overrides=[f"serve.model={adapter_dir}", f"serve.port={free_port()}",
                                       "serve.model_name=lora", "serve.num_cpus=1"]))
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        prompt = "def dumps(obj):"
        served = client.completions.create(model="lora", prompt=prompt, max_tokens=8, temperature=0)
    finally:
        stop()
    tok = AutoTokenizer.from_pretrained(out.export.out_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(out.export.out_dir, local_files_only=True, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    assert served.choices[0].text == tok.decode(new, skip_special_tokens=True)
    assert served.usage.completion_tokens == len(new)


@pytest.mark.slow
def test_lora_zero2_on_s3_resumes_and_exports_the_adapter_at_the_end(shards, s3, tmp_path):
    """ZeRO-2, base and run in S3: a re-run of the same run resumes its adapters and optimizer; the end-of-run export
    is the adapter dir (train.lora.export=adapter), naming the S3 base."""
    from bigray.train.export import committed_checkpoint, export
    from bigray.train.trainer import train

    base_uri = s3.uri("lora-base")
    STORE.copy_dir(build_base(str(tmp_path / "base")), base_uri)
    common = [f"model.pretrained={base_uri}", *LORA, "train.lora.export=adapter", "train.zero_stage=2",
              "train.eval_every=4", "train.checkpoint_every=4"]
    first = train(run_cfg(shards, s3.uri("lora-runs"), "lora2", *common, "train.max_steps=4"))
    assert first.export.adapter_only and first.export.step == 4
    before = tensors(STORE.local_dir(first.export.out_dir), "adapter_model.safetensors")  # the re-run overwrites it
    out = train(run_cfg(shards, s3.uri("lora-runs"), "lora2", *common, "train.max_steps=8"))
    assert [r["step"] for r in metrics_of(out.run_dir)] == [4, 5, 8]  # steps 1-4 were not run again
    checkpoint_holds_only_adapters(STORE.local_dir(committed_checkpoint(out.run_dir, STORE)),
                                   str(tmp_path / "base"))

    assert out.export.adapter_only and out.export.step == 8 and out.export.out_dir == join(out.run_dir, "export")
    adapter = STORE.local_dir(out.export.out_dir)
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == base_uri
    merged = export(out.run_dir, str(tmp_path / "merged"), STORE)
    hf_logits_match_probe(merged.out_dir, out.run_dir)
    merged_is_base_plus_adapter(merged.out_dir, adapter, str(tmp_path / "base"), scale=8 / 4)
    # The adapters went on training after the resume: the step-8 adapter differs from the step-4 one.
    after = tensors(adapter, "adapter_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after)
