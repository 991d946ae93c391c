"""Resuming a run from its own checkpoint on torch < 2.6 (the cu118 set: torch 2.1, transformers 4.55).

transformers 4.x calls check_torch_load_is_safe() before it loads a checkpoint's optimizer.pt / scheduler.pt (and
scaler.pt), which raises on torch < 2.6 (CVE-2025-32434: a crafted file can get past torch.load(weights_only=True)
there), with no setting to turn it off; safetensors weights load either way. The CVE is about loading someone else's
file. A rerun of `t2s train` resumes only from the run's own checkpoints/ (made by this run, with the settings
RunDir.check_settings compares), never from a downloaded one, so for that load alone the gate is lifted. The loads
themselves stay torch.load(weights_only=True): tensors and plain containers, which is all that AdamW's state and
the LR schedulers' state hold (a checkpoint never holds state that cannot be loaded back this way).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from jobs.lib.errors import T2SError


def gate_lifted_for(checkpoint: Path | None, own_checkpoints: Path, torch_is_new: bool) -> bool:
    """Whether the torch.load gate must be lifted to resume from `checkpoint` (pure: decided from paths and the
    torch version). Refuses a checkpoint outside the run's own checkpoints/ folder."""
    if checkpoint is None or torch_is_new:
        return False
    if checkpoint.resolve().parent != own_checkpoints.resolve():
        raise T2SError(f"{checkpoint} is not one of this run's checkpoints ({own_checkpoints}): on torch < 2.6 t2s "
                       "resumes only from the run's own checkpoints")
    return True


@contextlib.contextmanager
def own_checkpoint_loads(checkpoint: Path | None, own_checkpoints: Path):
    """While resuming from the run's own `checkpoint`: transformers' torch.load gate is lifted on torch < 2.6, and put
    back afterwards. On torch >= 2.6 (or with no checkpoint) nothing changes."""
    from transformers import trainer as trainer_module
    from transformers.utils import is_torch_greater_or_equal

    lift = gate_lifted_for(checkpoint, own_checkpoints, is_torch_greater_or_equal("2.6"))
    if not lift or not hasattr(trainer_module, "check_torch_load_is_safe"):
        yield
        return
    gate = trainer_module.check_torch_load_is_safe
    trainer_module.check_torch_load_is_safe = lambda: None  # the loads behind it pass weights_only=True
    try:
        yield
    finally:
        trainer_module.check_torch_load_is_safe = gate
