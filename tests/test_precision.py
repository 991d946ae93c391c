"""train.precision: every update is kept by default, what each precision means on each machine, what cannot run is
refused before a model loads, and merge saves bf16 weights after training in higher precision.

The end-to-end runs train the tiny model with configs/default.yaml's method and learning rate, with the model
loaded in bf16 (model.dtype=bfloat16: what `auto` gives on a GPU), so that the CPU shows what a GPU run keeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jobs.lib.config import TrainConfig, load_config
from jobs.lib.errors import T2SError
from jobs.lib.training import check_precision, kahan_adamw, keep_trainable_in_fp32, precision_plan, trainable_dtypes
from tests.conftest import ROOT, t2s

DEFAULT = load_config(ROOT / "configs" / "default.yaml").train  # the shipped default's method and learning rate
SINGLE = {"num_processes": 1}
ZERO3 = {"distributed_type": "DEEPSPEED", "num_processes": 2, "mixed_precision": "bf16",
         "deepspeed_config": {"zero_stage": 3, "zero3_init_flag": True}}


# ---------- the plan and its refusals (pure) ----------

@pytest.mark.parametrize("method, precision, on_gpu, weights, base, autocast, kahan", [
    ("full", "fp32_master", True, "float32", "float32", True, False),
    ("full", "fp32_master", False, "float32", "float32", False, False),  # no autocast on a CPU
    ("full", "bf16_kahan", True, "bfloat16", "bfloat16", True, True),
    ("full", "bf16_kahan", False, "bfloat16", "bfloat16", False, True),  # bf16 weights on CPU too
    ("full", "bf16", True, "bfloat16", "bfloat16", True, False),
    ("full", "fp32", True, "float32", "float32", False, False),
    ("lora", "fp32_master", True, "float32", "bfloat16", True, False),  # fp32 adapter on a bf16 base
    ("lora", "fp32_master", False, "float32", "float32", False, False),
    ("qlora", "fp32_master", True, "float32", "bfloat16", True, False),  # 4-bit compute and storage dtype
    ("qlora", "fp32", True, "float32", "float32", False, False),
])
def test_precision_plan(method, precision, on_gpu, weights, base, autocast, kahan):
    plan = precision_plan(TrainConfig(method=method, precision=precision), "auto", on_gpu)
    assert (plan.weights, plan.base, plan.autocast_bf16, plan.kahan) == (weights, base, autocast, kahan)
    assert plan.describe().startswith(f"precision {precision}: trainable weights {weights}")


def test_the_default_keeps_fp32_master_weights():
    assert TrainConfig().precision == "fp32_master"
    assert precision_plan(DEFAULT, "auto", on_gpu=True).weights == "float32"


@pytest.mark.parametrize("train, model_dtype, accelerate, on_gpu, gpu_bf16, optimi, expected", [
    ({"method": "lora", "precision": "bf16_kahan"}, "auto", SINGLE, True, True, True,
     "LoRA / QLoRA adapters always train in fp32: use train.precision: fp32_master"),
    ({"method": "full", "precision": "fp32_master"}, "auto", SINGLE, True, False, True,
     "train.precision fp32_master computes in bf16, which this GPU lacks"),
    ({"method": "full", "precision": "fp32"}, "bfloat16", SINGLE, True, False, True,
     "model.dtype bfloat16 computes in bf16, which this GPU lacks"),
    ({"method": "full", "precision": "bf16_kahan"}, "auto", SINGLE, False, False, False,
     "train.precision bf16_kahan needs torch-optimi"),
    ({"method": "full", "precision": "bf16"}, "auto", ZERO3, True, True, True,
     "DeepSpeed keeps fp32 master weights of its own"),
    ({"method": "full", "precision": "fp32"}, "auto", ZERO3, True, True, True,
     "the accelerate config says mixed_precision: bf16"),
])
def test_what_cannot_run_is_one_line_before_loading(train, model_dtype, accelerate, on_gpu, gpu_bf16, optimi, expected):
    with pytest.raises(T2SError, match=expected.replace(".", r"\.")):
        check_precision(TrainConfig(**train), model_dtype, accelerate, on_gpu, gpu_bf16, optimi)


def test_what_can_run_passes():
    for precision in ("fp32_master", "bf16_kahan", "bf16", "fp32"):  # on a CPU every one runs (bf16 is emulated)
        check_precision(TrainConfig(method="full", precision=precision), "auto", SINGLE, False, False, True)
    check_precision(TrainConfig(method="full", precision="fp32"), "auto", SINGLE, True, False, False)  # a T4
    check_precision(TrainConfig(method="qlora"), "auto", ZERO3, True, True, False)


def test_bf16_kahan_without_torch_optimi_is_refused_by_t2s_train_before_loading(copy_run, monkeypatch):
    from jobs import train
    from jobs.lib.rundir import RunDir

    run, config = copy_run("no-optimi", train={"method": "full", "precision": "bf16_kahan"})
    monkeypatch.setattr(train, "_has", lambda module: module != "optimi")
    monkeypatch.setattr(train, "_stream", lambda command: pytest.fail("the workers were launched"))
    with pytest.raises(T2SError, match="bf16_kahan needs torch-optimi"):
        train.check(load_config(config), RunDir(run))


# ---------- the libraries do what the plan says ----------

def test_kahan_adamw_keeps_the_steps_that_bf16_adamw_rounds_away():
    """lr 2e-5 on weights near 0.02 (half a bf16 ulp is 6e-5): plain AdamW on bf16 weights loses every step,
    AdamW with Kahan summation ends within a bf16 ulp of the fp32 run."""
    start = torch.linspace(0.016, 0.03, 512)
    grad = torch.linspace(-1, 1, 512).sign()  # a constant direction, so 100 steps move a weight by ~2e-3
    args = SimpleNamespace(learning_rate=2e-5, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)

    def train(dtype, make_optimizer):
        weight = torch.nn.Parameter(start.to(dtype, copy=True))
        optimizer = make_optimizer([weight])
        for _ in range(100):
            weight.grad = grad.to(dtype)
            optimizer.step()
        return weight.detach().float()

    adamw = lambda params: torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)  # noqa: E731
    optimi_cls, kwargs = kahan_adamw(args)
    reference = train(torch.float32, adamw)
    lost = train(torch.bfloat16, adamw)
    kept = train(torch.bfloat16, lambda params: optimi_cls(params, **kwargs))
    ulp = torch.finfo(torch.bfloat16).eps * reference.abs()
    assert (reference - start).abs().min() > 1e-3  # fp32 moved every weight
    assert torch.equal(lost, start.to(torch.bfloat16).float())  # bf16 AdamW moved none
    assert ((kept - reference).abs() <= ulp).all()  # Kahan summation followed fp32


def _tiny_trainer(model, lora: bool):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    from jobs.lib.tiny import build_tokenizer

    tokenizer: PreTrainedTokenizerFast = build_tokenizer(["SELECT name FROM head WHERE age > 56"] * 4, vocab_size=300)
    data = Dataset.from_dict({"input_ids": [[1, 5, 6, 7, 2]] * 4})
    args = SFTConfig(output_dir="unused", use_cpu=True, max_steps=1, report_to=[], dataset_num_proc=None)
    peft = LoraConfig(r=4, target_modules="all-linear", modules_to_save=["embed_tokens", "lm_head"],
                      task_type="CAUSAL_LM") if lora else None
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft)


def test_lora_adapters_and_modules_to_save_train_in_fp32_on_a_bf16_base(tmp_path, monkeypatch):
    """peft upcasts LoRA A/B to fp32 but leaves modules_to_save copies in the base's bf16 (both package sets):
    keep_trainable_in_fp32 makes every trainable weight fp32 and leaves the frozen base alone."""
    from jobs.lib.tiny import build_model

    monkeypatch.chdir(tmp_path)
    trainer = _tiny_trainer(build_model(vocab_size=300).to(torch.bfloat16), lora=True)
    assert trainable_dtypes(trainer.model) == {"float32", "bfloat16"}  # what the libraries leave
    keep_trainable_in_fp32(trainer.model)
    assert trainable_dtypes(trainer.model) == {"float32"}
    frozen = {str(p.dtype) for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == {"torch.bfloat16"}


# ---------- end to end: what the saved weights kept ----------

def _train(copy_run, name: str, **train) -> tuple[Path, Path, object]:
    settings = {"method": DEFAULT.method, "learning_rate": DEFAULT.learning_rate, **train}
    run, config = copy_run(name, model={"name_or_path": "tiny", "dtype": "bfloat16"}, train=settings)
    result = t2s("train", "--config", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run, config, result


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _moved(initial: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """Where training moved a weight from its start, both seen in the dtype it trained in."""
    return initial.to(trained.dtype) != trained


def _optimizer_state(run: Path) -> dict[str, dict]:
    """Each trainable weight's optimizer state in the last checkpoint, by name. The Trainer's parameter groups are
    the weights that decay, then the norms, each in the model's order; shapes are checked against the weights."""
    from transformers import AutoModelForCausalLM

    checkpoint = max((run / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    named = [n for n, _ in AutoModelForCausalLM.from_pretrained(str(checkpoint)).named_parameters()]
    order = [n for n in named if "norm" not in n] + [n for n in named if "norm" in n]
    assert [len(g["params"]) for g in state["param_groups"]] == [len(order) - sum("norm" in n for n in named),
                                                               sum("norm" in n for n in named)]
    by_name = {name: state["state"][index] for index, name in enumerate(order)}
    weights = _weights(checkpoint)
    assert all(by_name[n]["exp_avg_sq"].shape == weights[n].shape for n in named)
    return by_name


def _update_kept(initial: dict, trained: dict, state: dict) -> float:
    """The share of weights that moved from their start, among those that received a gradient (the optimizer's
    second moment is non-zero: embedding rows of tokens not in the batches, for one, get none)."""
    flowed = {n: state[n]["exp_avg_sq"] > 0 for n in initial}
    layers = [n for n in initial if "embed_tokens" not in n]  # so that the check is not vacuous
    assert sum(int(flowed[n].sum()) for n in layers) > 0.99 * sum(initial[n].numel() for n in layers)
    moved = sum(int(_moved(initial[n], trained[n])[flowed[n]].sum()) for n in initial)
    return moved / sum(int(f.sum()) for f in flowed.values())


@pytest.mark.slow
def test_default_precision_keeps_every_update_and_is_recorded(copy_run):
    run, _, result = _train(copy_run, "default")
    assert DEFAULT.method == "full" and DEFAULT.learning_rate <= 2e-5  # the case bf16 weights lose
    assert _update_kept(_weights(run / "base"), _weights(run / "adapter"), _optimizer_state(run)) == 1.0
    done = json.loads((run / "train.done").read_text())
    assert (done["precision"], done["weights_dtype"], done["optimizer"]) == ("fp32_master", "float32", "AdamW (torch)")
    line = "precision fp32_master: trainable weights float32 · compute float32 · AdamW (torch)"
    assert line in result.stdout and line in (run / "logs" / "train.log").read_text()


@pytest.mark.slow
def test_bf16_weights_lose_most_updates(copy_run):
    """The same check on bf16 weights with plain AdamW (what a GPU did before train.precision): most are lost."""
    run, _, _ = _train(copy_run, "bf16", precision="bf16")
    initial, trained = _weights(run / "base"), _weights(run / "adapter")
    assert trained["lm_head.weight"].dtype == torch.bfloat16
    assert _update_kept(initial, trained, _optimizer_state(run)) < 0.5
    assert not _moved(initial["model.norm.weight"], trained["model.norm.weight"]).any()  # 1.0 + 2e-5 is 1.0 in bf16


@pytest.mark.slow
def test_bf16_kahan_carries_the_lost_bits_in_the_optimizer_state(copy_run):
    """bf16 weights + their Kahan compensation (in the optimizer state) moved wherever gradients flowed."""
    run, _, _ = _train(copy_run, "kahan", precision="bf16_kahan")
    done = json.loads((run / "train.done").read_text())
    assert (done["weights_dtype"], done["optimizer"]) == ("bfloat16", "AdamW with Kahan summation (torch-optimi)")
    state, trained = _optimizer_state(run), _weights(run / "adapter")
    # float64: the compensation of some steps is below fp32's resolution at the weight's size
    effective = {n: trained[n].double() + state[n]["kahan_comp"].double() for n in trained}
    initial = {n: t.to(torch.bfloat16).double() for n, t in _weights(run / "base").items()}
    assert _update_kept(initial, effective, state) == 1.0
    assert _update_kept(initial, {n: t.double() for n, t in trained.items()}, state) < 0.9  # the bf16 weights alone


@pytest.mark.slow
def test_merge_saves_bf16_after_fp32_master_training_and_checks_the_rounding(copy_run):
    from safetensors import safe_open

    run, config, _ = _train(copy_run, "merge")
    result = t2s("merge", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    with safe_open(str(run / "merged" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    done = json.loads((run / "merge.done").read_text())
    assert done["dtype"] == "bfloat16" and 0 < done["rounding_error"] < 2e-2
    assert "bfloat16 weights within" in result.stdout
    result = t2s("merge", "--config", str(config), "--force", "--set", "merge.dtype=float32")
    assert result.returncode == 0 and json.loads((run / "merge.done").read_text())["rounding_error"] == 0


@pytest.mark.slow
def test_merge_checks_fail_when_the_merge_or_the_rounding_is_wrong(copy_run, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    from jobs import merge
    from jobs.lib.rundir import RunDir

    run, config = copy_run("lora-merge")
    assert t2s("train", "--config", str(config)).returncode == 0
    cfg = load_config(config)
    with monkeypatch.context() as patch:  # a merge that drops the adapter
        patch.setattr(BaseTuner, "merge_and_unload", lambda self, *args, **kwargs: self.unload())
        with pytest.raises(T2SError, match=r"merged logits differ from base \+ adapter"):
            merge.run(cfg, RunDir(run))
    monkeypatch.setitem(merge.ROUNDING_TOLERANCE, torch.bfloat16, 1e-9)
    with pytest.raises(T2SError, match="the weights rounded to bfloat16 give logits"):
        merge.run(cfg, RunDir(run))
    assert not (run / "merged").exists() and not (run / "merge.done").exists()
