"""zero.py's numerics defaults under real DeepSpeed (2 CPU ranks, gloo, bf16): every ZeRO stage accepts them."""

from __future__ import annotations

import json
import os
import socket

import torch

STAGES = (0, 1, 2, 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from bigray.config import ModelConfig, load_config
    from bigray.train.loss import lm_loss
    from bigray.train.model import build_model, model_config
    from bigray.train.zero import deepspeed_config, param_groups

    deepspeed.init_distributed("gloo")
    rows = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(rank))
    report = {}
    for stage in STAGES:
        overrides = [f"train.zero_stage={stage}", "train.micro_batch_size=2", "train.grad_accum_steps=2"]
        t = load_config(overrides=overrides).train
        ds_cfg = deepspeed_config(t, world, "bf16", on_gpu=False)
        torch.manual_seed(0)
        hint = HfDeepSpeedConfig(ds_cfg) if stage == 3 else None  # noqa: F841
        model = build_model(model_config(ModelConfig(preset="tiny"), 512, 32, 0))
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3),
                                          config=ds_cfg)
        losses = []
        for micro in range(2):  # one optimizer step of two accumulated micro batches
            loss = lm_loss(engine, rows[2 * micro:2 * micro + 2, :-1], rows[2 * micro:2 * micro + 2, 1:], "plain")
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
        model_dtype, accum_dtype = engine.get_data_types()
        report[stage] = {"model": str(model_dtype), "accum": str(accum_dtype), "losses": losses,
                         "comm": str(engine.communication_data_type), "steps": engine.global_steps}
        engine.destroy()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    torch.distributed.destroy_process_group()


def test_bf16_runs_reduce_and_accumulate_in_fp32_at_every_stage(tmp_path):
    torch.multiprocessing.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    report = json.loads((tmp_path / "rank0.json").read_text())
    for stage in map(str, STAGES):
        r = report[stage]
        assert r["model"] == "torch.bfloat16" and r["comm"] == "torch.float32", r
        assert r["accum"] == ("torch.bfloat16" if stage == "0" else "torch.float32"), r
        assert r["steps"] == 1 and all(4.0 < loss < 8.0 for loss in r["losses"]), r  # ln(512) = 6.2 at init


WORKER_THREADS = """
import json, os, sys, tempfile
import ray, ray.train
from ray.train.torch import TorchTrainer
from bigray.config import load_config
from bigray.train.zero import worker_env_vars

def report_threads(config):
    import torch
    with open(config["out"], "w") as f:  # the worker runs on this machine: a file is the simplest channel back
        json.dump({"threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}, f)

t = load_config(overrides=["train.cpus_per_worker=2"]).train
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
out = {}
for name, env in (("inherited", {}), ("bigray", {"env_vars": worker_env_vars(t)})):
    tmp = tempfile.mkdtemp()
    trainer = TorchTrainer(report_threads, train_loop_config={"out": os.path.join(tmp, "threads.json")},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=tmp, worker_runtime_env=env))
    trainer.fit()
    out[name] = json.load(open(os.path.join(tmp, "threads.json")))
ray.shutdown()
print(json.dumps(out))
"""


def test_workers_get_cpus_per_worker_threads_where_ray_passes_on_one():
    """A node started with OMP_NUM_THREADS=1 (as Ray's cluster launcher starts them): workers inherit 1 unless
    bigray's worker env sets cpus_per_worker."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", WORKER_THREADS], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["inherited"]["threads"] == 1  # the problem
    assert out["bigray"] == {"threads": 2, "omp": "2"}
