"""LoRA through peft: the adapters on a pretrained model, the check before workers start, and what export needs.

`apply_lora` wraps the HF model in peft's LoRA inside `setup_engine`, before DeepSpeed sees it: the base weights are
frozen, so the optimizer (built from trainable parameters only) and the checkpoints (`exclude_frozen_parameters`)
hold the adapters alone; a resume reloads the base from `model.pretrained`. Under ZeRO-3 the base is built inside
`deepspeed.zero.Init` and peft adds its small A/B layers after it, as ordinary tensors: `deepspeed.initialize`
partitions every parameter that is not yet a ZeRO parameter (`DeepSpeedZeRoOffload._convert_to_zero_parameters`),
which is how HF Trainer / TRL run LoRA under ZeRO-3 too.

Rank 0 writes the peft config (`adapter/adapter_config.json`, with `base_model_name_or_path` = `model.pretrained`)
into every checkpoint, so `bigray export` knows the base and the adapter shapes without the run's config.
"""

from __future__ import annotations

import json
import os
import re

from bigray.config import LoraConfig, ModelConfig
from bigray.errors import BigrayError, ConfigError
from bigray.storage import Store, is_remote, join

ADAPTER_DIR = "adapter"  # inside a checkpoint: the peft config of a LoRA run (absent for full fine-tuning)
ADAPTER_CONFIG = "adapter_config.json"  # peft's file name, in a checkpoint's adapter/ and in an adapter export


def peft_config(lora: LoraConfig, base_model: str | None = None):
    """peft's LoraConfig for `train.lora`."""
    import peft

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def base_reference(pretrained: str) -> str:
    """`model.pretrained` as an adapter records it: s3:// URIs as they are, local paths made absolute."""
    return pretrained if is_remote(pretrained) else os.path.abspath(pretrained)


def wrap(module, config, base_model: str | None):
    """peft's model around `module` (base frozen, adapters trainable), recording `base_model` as its base."""
    import peft

    # get_peft_model records the local dir the base was loaded from (a temp copy of an s3:// base, and warns of the
    # rename): the adapter must name the base it can be found at again.
    config.base_model_name_or_path = None
    model = peft.get_peft_model(module, config)
    model.peft_config["default"].base_model_name_or_path = base_model
    return model


def apply_lora(module, lora: LoraConfig, model: ModelConfig):
    """LoRA adapters on the HF model, its own weights frozen: only the adapters train and reach the optimizer.

    The wrapped model's state_dict holds the adapters only, so DeepSpeed's checkpoint does too.
    """
    peft_model = wrap(module, peft_config(lora), base_reference(model.pretrained))
    # DeepSpeed's exclude_frozen_parameters drops frozen names from named_parameters(), which lists a tied weight
    # once: the other name (lm_head.weight, tied to the embeddings) stayed, a vocab x hidden matrix in every
    # ZeRO-2 checkpoint. Every name a frozen tensor has is dropped here.
    frozen = {name for name, p in peft_model.named_parameters(remove_duplicate=False) if not p.requires_grad}

    def drop_frozen(_module, state_dict, prefix, _metadata):
        for name in frozen:
            state_dict.pop(prefix + name, None)

    peft_model.register_state_dict_post_hook(drop_frozen)
    return peft_model


def trainable_parameters(module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a ZeRO-3 partitioned parameter counts by its full size (`ds_numel`)."""
    trainable = total = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def check_lora(lora: LoraConfig | None, model: ModelConfig, store: Store) -> None:
    """Before any worker starts: LoRA needs `model.pretrained`, and each of `target_modules` must exist in it and
    be a layer peft can adapt. Builds the model on the meta device from its config.json: no weights are read."""
    if lora is None:
        return
    if not model.pretrained:
        raise ConfigError("train.lora needs model.pretrained: LoRA trains adapters on a pretrained model's frozen "
                          "weights (set model.pretrained=<HF dir>, or train.lora=null to train every weight)")
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = json.loads(store.read_bytes(join(model.pretrained, "config.json")))
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    if isinstance(lora.target_modules, list):
        names = [name for name, _ in base.named_modules()]
        # peft raises only when no target matches at all; a misspelt one beside a right one would pass silently.
        missing = [t for t in lora.target_modules
                   if not any(check_target_module_exists(peft_config(lora.model_copy(update={"target_modules": [t]})),
                                                         name) for name in names)]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in base.named_modules()
                             if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
            raise ConfigError(f"train.lora.target_modules: {missing} not in {model.pretrained} "
                              f"({type(base).__name__}); its linear layers: {linear}")
    try:
        wrap(base, peft_config(lora), None)
    except ValueError as exc:  # a target that is not a layer peft adapts (a whole decoder block, a norm)
        # peft's message prints the whole module; its class name is enough.
        unsupported = re.search(r"Target module (\w+)\(.*?is not supported\. (.*)", str(exc), re.S)
        reason = f"matches a {unsupported[1]}, not a layer peft adapts. {unsupported[2]}" if unsupported else exc
        raise ConfigError(f"train.lora.target_modules: {reason}") from None


def lora_resume_key(lora: LoraConfig | None) -> dict | None:
    """What a resume must agree with about the adapters (the export choice may change)."""
    return lora.model_dump(mode="json", exclude={"export"}) if lora else None


def save_adapter_config(module, out_dir: str) -> None:
    """Into a checkpoint: the peft config of a LoRA model (`ADAPTER_DIR/adapter_config.json`); nothing otherwise."""
    configs = getattr(module, "peft_config", None)
    if configs:
        configs["default"].save_pretrained(os.path.join(out_dir, ADAPTER_DIR))


def checkpoint_adapter(ckpt_dir: str):
    """The peft config a LoRA checkpoint (a local copy) carries, None for full fine-tuning."""
    if not os.path.exists(os.path.join(ckpt_dir, ADAPTER_DIR, ADAPTER_CONFIG)):
        return None
    import peft

    return peft.LoraConfig.from_pretrained(os.path.join(ckpt_dir, ADAPTER_DIR))


def load_base(base_model: str, store: Store, dtype=None):
    """The base model an adapter names (local or s3:// HF dir, safetensors only)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        local = store.local_dir(base_model)
    except (OSError, ValueError) as exc:
        raise BigrayError(f"LoRA base model {base_model}: cannot read it ({exc})") from None
    if not os.path.exists(os.path.join(local, "config.json")):
        raise BigrayError(f"LoRA base model {base_model}: not an HF model dir (no config.json)")
    return AutoModelForCausalLM.from_pretrained(local, local_files_only=True, use_safetensors=True,
                                                dtype=dtype or torch.float32, attn_implementation="sdpa")


def adapter_model(config, state: dict, store: Store, where: str):
    """The checkpoint's adapters (`state`, consolidated from ZeRO) on their base, loaded from the base's dir."""
    model = wrap(load_base(config.base_model_name_or_path, store), config, config.base_model_name_or_path)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or adapters & set(missing):
        raise BigrayError(f"{where}: checkpoint does not fit a LoRA of {config.base_model_name_or_path} "
                          f"(missing adapters {sorted(adapters & set(missing))[:5]}, unexpected {unexpected[:5]})")
    return model.eval()


def merge(model, input_ids) -> tuple:
    """(the base with the adapters merged into its weights, max |logit difference| from the adapter model on
    `input_ids`): merging must not change what the model computes."""
    import torch

    with torch.no_grad():
        before = model(input_ids=input_ids).logits.float()
        merged = model.merge_and_unload().eval()
        after = merged(input_ids=input_ids).logits.float()
    return merged, (after - before).abs().max().item()


def save_adapter(model, out_dir: str) -> None:
    """peft's adapter dir: adapter_config.json (the base named) and adapter_model.safetensors."""
    model.save_pretrained(out_dir, safe_serialization=True)

