"""jobs/lib/resume.py: a run resumes from its own checkpoint on torch < 2.6 too (the cu118 set), where transformers 4.x
refuses torch.load before optimizer.pt / scheduler.pt; the end-to-end resumes are in test_train.py and
test_restart.py, the two-process ZeRO-3 one in test_distributed.py."""

import pytest
import torch

from jobs.lib.errors import T2SError
from jobs.lib.resume import gate_lifted_for, own_checkpoint_loads


def test_the_gate_is_lifted_only_for_the_runs_own_checkpoint_on_an_old_torch(tmp_path):
    own = tmp_path / "runs" / "t" / "checkpoints"
    assert gate_lifted_for(own / "checkpoint-3", own, torch_is_new=False)
    assert not gate_lifted_for(own / "checkpoint-3", own, torch_is_new=True)
    assert not gate_lifted_for(None, own, torch_is_new=False)
    with pytest.raises(T2SError, match="not one of this run's checkpoints"):
        gate_lifted_for(tmp_path / "elsewhere" / "checkpoint-3", own, torch_is_new=False)


def test_a_checkpoints_optimizer_and_schedule_load_back_weights_only(tmp_path):
    """What the Trainer saves (AdamW's and a LambdaLR schedule's state) loads with weights_only=True behind the
    gate, as transformers does it, on the installed torch."""
    from transformers import get_scheduler
    from transformers import trainer as trainer_module

    own = tmp_path / "checkpoints"
    checkpoint = own / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    for _ in range(2):
        weight.sum().backward()
        optimizer.step()
        schedule.step()
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    torch.save(schedule.state_dict(), checkpoint / "scheduler.pt")

    with own_checkpoint_loads(checkpoint, own):
        trainer_module.check_torch_load_is_safe()  # lifted here on torch < 2.6; a no-op on torch >= 2.6 anyway
        optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        schedule_state = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=1e-2)
    restored.load_state_dict(optimizer_state)
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])
    restored_schedule = get_scheduler("cosine", restored, num_warmup_steps=1, num_training_steps=10)
    restored_schedule.load_state_dict(schedule_state)
    assert restored_schedule.get_last_lr() == schedule.get_last_lr() and restored_schedule.last_epoch == 2

    from transformers.utils import is_torch_greater_or_equal

    if not is_torch_greater_or_equal("2.6"):  # the gate is back after the resume
        with pytest.raises(ValueError, match="torch"):
            trainer_module.check_torch_load_is_safe()
