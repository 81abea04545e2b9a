"""The background checkpoint writer's snapshot: what it writes is the state at save time, not after later steps."""

from __future__ import annotations

import collections

import torch


def test_host_copy_is_a_snapshot_with_the_same_structure():
    from bigray.train.checkpoint_writer import host_copy

    weight = torch.ones(3)
    state = {"module": collections.OrderedDict(w=weight), "groups": [weight[:2], (weight, 7)], "step": 5, "tag": "ds"}
    snap = host_copy(state)
    weight.add_(1)  # the next optimizer step, in place
    assert type(snap["module"]) is collections.OrderedDict and snap["step"] == 5 and snap["tag"] == "ds"
    torch.testing.assert_close(snap["module"]["w"], torch.ones(3))
    torch.testing.assert_close(snap["groups"][0], torch.ones(2))
    assert isinstance(snap["groups"][1], tuple) and snap["groups"][1][1] == 7


def test_writer_saves_nothing_until_write_all_then_what_was_handed_over(tmp_path):
    from bigray.train.checkpoint_writer import HostCopyWriter

    writer, exp_avg = HostCopyWriter(), torch.arange(4.0)
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    writer.save({"optimizer_state_dict": {"exp_avg": exp_avg}}, str(path))
    exp_avg.mul_(0)
    assert not path.exists()
    writer.write_all()
    torch.testing.assert_close(torch.load(path)["optimizer_state_dict"]["exp_avg"], torch.arange(4.0))
    assert writer.queue == []


def test_the_next_checkpoint_copies_into_the_previous_ones_buffers(tmp_path):
    from bigray.train.checkpoint_writer import HostCopyWriter

    writer, exp_avg, step = HostCopyWriter(), torch.arange(4.0), torch.zeros(1)
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    writer.save({"state": [exp_avg, step]}, str(tmp_path / "a" / name))
    first = writer.queue[-1][0]["state"]
    (tmp_path / "a").mkdir()
    writer.write_all()
    exp_avg.add_(10)
    writer.save({"state": [exp_avg, torch.zeros(2)]}, str(tmp_path / "b" / name))  # the same file, a new step
    second = writer.queue[-1][0]["state"]
    assert second[0].data_ptr() == first[0].data_ptr()  # reused: no allocation, no page faults
    assert second[1].data_ptr() != first[1].data_ptr() and second[1].shape == (2,)  # another shape: a new buffer
    (tmp_path / "b").mkdir()
    writer.write_all()
    torch.testing.assert_close(torch.load(tmp_path / "a" / name)["state"][0], torch.arange(4.0))
    torch.testing.assert_close(torch.load(tmp_path / "b" / name)["state"][0], torch.arange(4.0) + 10)


def test_yield_cpu_lowers_the_calling_thread_only():
    import os
    import sys
    import threading

    import pytest

    from bigray.train.checkpoint_writer import yield_cpu

    if sys.platform != "linux":
        pytest.skip("thread priorities are set on Linux only")
    seen = {}

    def writer_thread():
        yield_cpu()
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=writer_thread)
    thread.start()
    thread.join()
    assert seen["writer"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19


def test_before_next_step_runs_once_before_the_wrapped_optimizer_changes_its_states():
    from bigray.train.checkpoint_writer import before_next_step

    weight = torch.nn.Parameter(torch.ones(2))
    calls = []

    class Wrapper:  # how DeepSpeed's ZeRO optimizers hold the torch optimizer
        optimizer = torch.optim.SGD([weight], lr=1.0)

    before_next_step(Wrapper(), lambda: calls.append(weight.detach().clone()))
    assert calls == []
    for _ in range(2):
        weight.grad = torch.ones(2)
        Wrapper.optimizer.step()
    assert len(calls) == 1
    torch.testing.assert_close(calls[0], torch.ones(2))  # before the first step changed the weight
