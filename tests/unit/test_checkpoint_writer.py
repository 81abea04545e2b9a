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
