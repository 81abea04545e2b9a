"""Chunked loss under real DeepSpeed ZeRO 0-3 (2 CPU ranks, gloo): same loss and full gradients as plain."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

STAGES = (0, 1, 2, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(stage: int, world: int):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from bigray.config import ModelConfig, load_config
    from bigray.train.model import build_model, model_config
    from bigray.train.zero import deepspeed_config, param_groups

    t = load_config(overrides=[f"train.zero_stage={stage}", "train.precision=fp32", "train.micro_batch_size=2"]).train
    ds_cfg = deepspeed_config(t, world, "fp32", on_gpu=False)
    torch.manual_seed(0)
    hint = HfDeepSpeedConfig(ds_cfg) if stage == 3 else None  # noqa: F841 - builds the model inside zero.Init
    model = build_model(model_config(ModelConfig(preset="tiny"), 512, 64, 0))
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    return engine


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from bigray.train.loss import lm_loss

    deepspeed.init_distributed("gloo")
    rows = torch.randint(0, 512, (2, 65), generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    report = {}
    for stage in STAGES:
        result = {}
        for impl in ("plain", "chunked"):
            engine = _engine(stage, world)
            loss = lm_loss(engine, rows[:, :-1], rows[:, 1:], impl)
            engine.backward(loss)
            # Full (all-ranks averaged, unpartitioned) gradients, whatever the stage keeps where.
            full = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
            result[impl] = (loss.item(), full)
            engine.destroy()
        (plain_loss, plain_grads), (chunked_loss, chunked_grads) = result["plain"], result["chunked"]
        report[stage] = {"loss_diff": abs(plain_loss - chunked_loss), "loss": plain_loss,
                         "grad_diff": max((plain_grads[n] - chunked_grads[n]).abs().max().item() for n in plain_grads),
                         "grad_norm": sum(g.norm() ** 2 for g in plain_grads.values()).sqrt().item()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    torch.distributed.destroy_process_group()


def test_chunked_equals_plain_under_every_zero_stage(tmp_path):
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for stage in map(str, STAGES):
        for report in reports:
            assert report[stage]["grad_norm"] > 0.1  # the gradients compared are real ones
            assert report[stage]["loss_diff"] < 1e-5, (stage, report[stage])
            assert report[stage]["grad_diff"] < 1e-5, (stage, report[stage])
        # ranks saw different rows but hold the same (reduced) full gradients
        assert reports[0][stage]["grad_norm"] == pytest.approx(reports[1][stage]["grad_norm"], rel=1e-5)
