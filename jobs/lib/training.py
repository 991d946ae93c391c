"""What train and rl share about training a model: how a run keeps and computes its weights (train.precision
resolved for the method and the machine), what the installed stack can do, the base model loaded for training (LoRA,
QLoRA or full), and the checks of a saved adapter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

from jobs.lib.config import Config, TrainConfig
from jobs.lib.errors import T2SError
from jobs.lib.rundir import RunDir


class PrecisionPlan(NamedTuple):
    """How a run keeps and computes its weights (train.precision resolved for this method and machine)."""
    precision: str
    weights: str  # dtype of the trainable weights (and of the optimizer states): what keeps the updates
    base: str  # dtype the model is loaded in (the frozen base of LoRA / QLoRA; the weights themselves for full)
    autocast_bf16: bool  # matmuls in bf16 autocast (the Trainer's bf16=True)
    kahan: bool  # AdamW with Kahan summation (torch-optimi) instead of torch's AdamW

    @property
    def compute(self) -> str:
        return "bfloat16 autocast" if self.autocast_bf16 else self.weights

    @property
    def optimizer(self) -> str:
        return "AdamW with Kahan summation (torch-optimi)" if self.kahan else "AdamW (torch)"

    def describe(self) -> str:
        base = f" · frozen base {self.base}" if self.base != self.weights else ""
        return (f"precision {self.precision}: trainable weights {self.weights}{base} · compute {self.compute} · "
                f"{self.optimizer}")


def precision_plan(train: TrainConfig, model_dtype: str, on_gpu: bool) -> PrecisionPlan:
    """train.precision for this method and machine. LoRA / QLoRA adapters train in fp32 whatever the base's dtype.
    On CPU nothing is autocast: bf16 means bf16 weights (as on a GPU, so what they keep is the same), and the frozen
    base of LoRA / QLoRA is fp32 there (bf16 buys no speed on a CPU, and torch 2.1 cannot mix the two in attention)."""
    p = train.precision
    autocast = on_gpu and p != "fp32"
    if train.method == "full":
        weights = "float32" if p in ("fp32_master", "fp32") else "bfloat16"
        return PrecisionPlan(p, weights, weights, autocast, kahan=p == "bf16_kahan")
    base = "bfloat16" if autocast else "float32"  # QLoRA: the 4-bit compute and storage dtype
    if train.method == "lora" and on_gpu and model_dtype != "auto":
        base = model_dtype
    return PrecisionPlan(p, "float32", base, autocast, kahan=False)


def check_precision(train: TrainConfig, model_dtype: str, accelerate: dict, on_gpu: bool, gpu_bf16: bool,
                    have_optimi: bool) -> None:
    """What the machine or the installed packages cannot do for train.precision, as one line, before loading."""
    p = train.precision
    if p in ("bf16", "bf16_kahan") and train.method != "full":
        raise T2SError(f"train.precision {p} keeps trainable weights in bf16, but LoRA / QLoRA adapters always train "
                       "in fp32: use train.precision: fp32_master (or fp32)")
    if on_gpu and not gpu_bf16 and (p != "fp32" or model_dtype == "bfloat16"):
        what = f"train.precision {p}" if p != "fp32" else "model.dtype bfloat16"
        raise T2SError(f"{what} computes in bf16, which this GPU lacks (bf16 needs compute capability >= 8.0): "
                       "set train.precision: fp32 and model.dtype: auto")
    deepspeed = accelerate.get("distributed_type") == "DEEPSPEED"
    if deepspeed and p in ("bf16", "bf16_kahan"):
        raise T2SError(f"train.precision {p} under DeepSpeed: DeepSpeed keeps fp32 master weights of its own and wraps "
                       "the optimizer, so use train.precision: fp32_master")
    if deepspeed and on_gpu and p == "fp32" and accelerate.get("mixed_precision") == "bf16":
        raise T2SError("train.precision fp32, but the accelerate config says mixed_precision: bf16: set it to 'no' "
                       "there, or use train.precision: fp32_master")
    if p == "bf16_kahan" and not have_optimi:
        raise T2SError("train.precision bf16_kahan needs torch-optimi (its AdamW with Kahan summation): "
                       "pip install torch-optimi, or use train.precision: fp32_master")


class Stack(NamedTuple):
    """What the installed packages can do that the cu118 set's (torch 2.1, bitsandbytes 0.45) cannot."""
    masks_packed_examples: bool  # keeps padding-free examples apart without flash-attn (torch >= 2.6)
    trains_on_cpu_processes: bool  # accelerate's torch.cpu.set_device; gloo all-gathers for ZeRO-3 (torch >= 2.2)
    quantizes_on_cpu: bool  # bitsandbytes' CPU backend for QLoRA without a GPU (bitsandbytes >= 0.46)


def installed_stack() -> Stack:
    # transformers masks packed examples by position_ids only on torch >= 2.6; trl 0.22 (the cu118 set's) also hands
    # position_ids to flash-attn alone. (Checkpoints resume on every stack: jobs/lib/resume.py.)
    from transformers.utils import is_torch_greater_or_equal

    bitsandbytes = importlib.util.find_spec("bitsandbytes")  # found, not imported: that takes seconds
    return Stack(masks_packed_examples=is_torch_greater_or_equal("2.6"),
                 trains_on_cpu_processes=is_torch_greater_or_equal("2.2"),
                 quantizes_on_cpu=bitsandbytes is not None and any(
                     (Path(folder) / "backends" / "cpu").is_dir() for folder in bitsandbytes.submodule_search_locations))


def check_stack(train: TrainConfig, accelerate: dict, attention: str, gpus_present: int, stack: Stack) -> None:
    """What the installed stack cannot do for this run, as one line each."""
    if train.packing == "padding_free" and attention != "flash_attention_2" and not stack.masks_packed_examples:
        raise T2SError(f"train.packing padding_free would let packed examples attend to each other with {attention} "
                       "on torch < 2.6: set train.packing: none, or use flash-attn on a GPU")
    processes = int(accelerate.get("num_processes", 1)) * int(accelerate.get("num_machines", 1))
    if accelerate.get("use_cpu") and processes > 1 and not stack.trains_on_cpu_processes:
        raise T2SError(f"the accelerate config trains on {processes} CPU processes, which needs torch >= 2.2: "
                       "use train.accelerate_config: single, or run the processes on GPUs")
    if train.method == "qlora" and gpus_present == 0 and not stack.quantizes_on_cpu:
        raise T2SError("train.method qlora without a GPU needs bitsandbytes >= 0.46 (its CPU backend): "
                       "use train.method: lora, or run on a GPU")


def adapter_problems(folder: Path) -> list[str]:
    """Why a saved LoRA adapter is unusable: missing, empty, partial (a layer without its A or B), or untrained."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file() or not (folder / "adapter_config.json").is_file():
        return [f"{folder} lacks adapter_model.safetensors or adapter_config.json"]
    with safe_open(str(weights), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    problems = [f"{k} is empty" for k, t in tensors.items() if t.numel() == 0]
    a_layers = {k.replace("lora_A", "") for k in tensors if "lora_A" in k}
    b_layers = {k.replace("lora_B", "") for k in tensors if "lora_B" in k}
    if not a_layers:
        problems.append("no LoRA weights in the adapter")
    if a_layers != b_layers:
        problems.append(f"{len(a_layers ^ b_layers)} LoRA layers lack their A or B half")
    if b_layers and all(float(t.abs().sum()) == 0 for k, t in tensors.items() if "lora_B" in k):
        problems.append("every lora_B is zero: the adapter does not change the model")
    return problems


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def keep_4bit_weights_unpacked(model) -> None:
    """Stops bitsandbytes (0.50 here) repacking 4-bit weights for its CPU kernel on CPUs with AVX512-BF16: it does
    so at the first no-grad forward (an eval step) and then cannot save a checkpoint when quant_storage is not
    uint8, as ours is (an AssertionError in _convert_weight_packed_for_cpu_inverse). Training never uses it."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_base_for_training(cfg: Config, run: RunDir, on_gpu: bool):
    import torch
    from peft import LoraConfig

    from jobs.lib.models import base_model_path, load_model, pick_attention

    t = cfg.train
    plan = precision_plan(cfg.train, cfg.model.dtype, on_gpu)
    dtype = getattr(torch, plan.base)
    attention = pick_attention(cfg.model.attn_implementation)
    extra = {}
    if t.method == "qlora":
        from transformers import BitsAndBytesConfig

        # quant_storage = compute dtype, so ZeRO-3 can shard the 4-bit weights like any other bf16 tensor.
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
        )
    print(f"attention: {attention} · method: {t.method} · {plan.describe()}", flush=True)
    model = load_model(base_model_path(cfg, run), gguf_file=cfg.model.gguf_file, dtype=dtype,
                       attn_implementation=attention, **extra)
    model.config.use_cache = False
    if t.method == "qlora" and not on_gpu:
        keep_4bit_weights_unpacked(model)
    peft_config = None
    if t.method in ("lora", "qlora"):
        peft_config = LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                 target_modules=t.lora.target_modules,
                                 modules_to_save=t.lora.modules_to_save, task_type="CAUSAL_LM")
    return model, peft_config


def kahan_adamw(args):
    """(optimizer class, kwargs) for the Trainer: torch-optimi's AdamW with Kahan summation, with the training
    arguments' learning rate, betas and epsilon (optimi's defaults differ), so that it differs from the default AdamW
    in that alone. (The Trainer gives each parameter group its own weight decay.)"""
    from optimi import AdamW

    return AdamW, {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon,
                   "kahan_sum": True}


def keep_trainable_in_fp32(model) -> None:
    """Adapters train in fp32 whatever the base's dtype: peft upcasts LoRA A/B but not modules_to_save copies, and
    trl casts QLoRA adapters to bf16. (Not under DeepSpeed: it keeps fp32 master weights itself and needs one dtype.)"""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def trainable_dtypes(model) -> set[str]:
    return {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
