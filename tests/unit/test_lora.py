"""LoRA (bigray/train/lora.py) on a tiny Llama saved to a temp dir, checked against peft's own counts and loaders."""

from __future__ import annotations

import pytest
import torch

from bigray.config import LoraConfig, ModelConfig, TrainConfig
from bigray.errors import BigrayError, ConfigError
from bigray.serve.engine import adapter_base, load_model
from bigray.storage import Store
from bigray.train import lora
from bigray.train.loop import build_optimizer, check_resume, resume_keys

STORE = Store()


@pytest.fixture
def base_dir(tmp_path):
    """A tiny pretrained Llama (random init, seeded) saved like any HF dir; no hub access."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    path = tmp_path / "base"
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def lora_model(base_dir, **settings):
    model = lora.load_base(base_dir, STORE)
    return lora.apply_lora(model, LoraConfig(**settings), ModelConfig(pretrained=base_dir))


def randomize_adapters(model):
    """Training leaves B non-zero; peft initialises it to zero (the adapter starts as a no-op)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)


def test_only_adapters_train_and_reach_the_optimizer(base_dir):
    model = lora_model(base_dir, r=4, target_modules=["q_proj", "v_proj"])
    trainable, total = lora.trainable_parameters(model)
    assert (trainable, total) == model.get_nb_trainable_parameters()
    # q_proj 32->32 and v_proj 32->16 (2 kv heads of 8) in each of 2 layers: A is r x in, B is out x r.
    assert trainable == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    optimizer = build_optimizer(model, TrainConfig(lora=LoraConfig(r=4)), on_gpu=False)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for name, p in model.named_parameters() if "lora_" in name}
    assert in_optimizer == adapters
    assert len(optimizer.param_groups) == 1, "no empty no-decay group: ZeRO drops it, the LR scheduler would not"
    assert all(not p.requires_grad for name, p in model.named_parameters() if "lora_" not in name)
    # What DeepSpeed's checkpoint saves: the adapters, not the frozen base (nor its tied lm_head under another name).
    assert set(model.state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_all_linear_adapts_every_linear_layer_but_the_head(base_dir):
    model = lora_model(base_dir, r=2)
    adapted = {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert model.peft_config["default"].base_model_name_or_path == base_dir


def test_merged_model_computes_what_the_adapter_model_computes(base_dir, tmp_path):
    """Export's path (adapter state on the base, merged) and serve's (the adapter dir on its base)."""
    trained = lora_model(base_dir, r=4, alpha=8, dropout=0.1)
    randomize_adapters(trained)
    state = {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}
    config = lora.peft_config(LoraConfig(r=4, alpha=8, dropout=0.1), base_dir)

    model = lora.adapter_model(config, state, STORE, "ckpt")
    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
        base_logits = lora.load_base(base_dir, STORE)(input_ids=ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2, "the adapters must change the model"

    lora.save_adapter(model, str(tmp_path / "adapter"))
    assert adapter_base(str(tmp_path / "adapter")) == base_dir
    merged, diff = lora.merge(model, ids)
    assert diff < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_logits, atol=1e-4, rtol=1e-4)
        # Serve's path, through peft's own loader: the adapter dir on its base, merged at load.
        served = load_model(str(tmp_path / "adapter"), torch.float32, base_dir)
        torch.testing.assert_close(served(input_ids=ids).logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert not any("lora_" in name for name, _ in served.named_parameters())


def test_a_checkpoint_missing_adapters_is_refused(base_dir):
    trained = lora_model(base_dir, r=2, target_modules=["q_proj"])
    state = {n: p.detach() for n, p in trained.named_parameters() if p.requires_grad}
    config = lora.peft_config(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), base_dir)
    with pytest.raises(BigrayError, match="missing adapters"):
        lora.adapter_model(config, state, STORE, "ckpt")


def test_check_lora_names_the_key_before_workers_start(base_dir):
    model = ModelConfig(pretrained=base_dir)
    lora.check_lora(LoraConfig(target_modules=["q_proj", "down_proj"]), model, STORE)
    lora.check_lora(None, ModelConfig(), STORE)  # full fine-tuning: nothing to check
    with pytest.raises(ConfigError, match=r"train.lora.target_modules: \['qproj'\] not in .*'q_proj'"):
        lora.check_lora(LoraConfig(target_modules=["q_proj", "qproj"]), model, STORE)
    with pytest.raises(ConfigError, match="train.lora.target_modules: matches a LlamaMLP, not a layer peft adapts"):
        lora.check_lora(LoraConfig(target_modules=["mlp"]), model, STORE)
    with pytest.raises(ConfigError, match="train.lora needs model.pretrained"):
        lora.check_lora(LoraConfig(), ModelConfig(preset="tiny"), STORE)


def test_resume_must_keep_the_lora_settings():
    t = TrainConfig(lora=LoraConfig(r=8))
    recorded = resume_keys(t, 2, {})
    check_resume(recorded, resume_keys(t.model_copy(update={"lora": LoraConfig(r=8, export="adapter")}), 2, {}), "c")
    with pytest.raises(BigrayError, match="lora: checkpoint"):
        check_resume(recorded, resume_keys(t.model_copy(update={"lora": LoraConfig(r=16)}), 2, {}), "c")
    with pytest.raises(BigrayError, match="lora: checkpoint"):
        check_resume(recorded, resume_keys(t.model_copy(update={"lora": None}), 2, {}), "c")


def test_export_flag_and_vllm_refusing_an_adapter_dir(tmp_path):
    from bigray.cli import build_parser
    from bigray.config import load_config
    from bigray.serve.deploy import build_app

    assert build_parser().parse_args(["export", "run", "out", "--adapter-only"]).adapter_only
    assert not build_parser().parse_args(["export", "run", "out"]).adapter_only
    (tmp_path / "adapter_config.json").write_text('{"base_model_name_or_path": "/models/base"}')
    assert adapter_base(str(tmp_path)) == "/models/base"
    with pytest.raises(ConfigError, match="serve.model: .* is a LoRA adapter dir"):
        build_app(load_config(overrides=["serve.engine=vllm", f"serve.model={tmp_path}"]))
