"""merge: the adapter folded into the fp32 base (never into a 4-bit or bf16 copy), saved in merge.dtype (bf16 by
default: what users deploy) as safetensors with tokenizer, chat template and a greedy generation config, and
checked on sample prompts, twice: in fp32 the merged model's logits must equal base + adapter's (the merge itself),
then the saved weights, rounded to merge.dtype, must give the fp32 logits within what that rounding costs. A full
fine-tune (trained in fp32 master weights, or bf16) has nothing to merge and gets the second check only.
"""

from __future__ import annotations

import json

import torch

from jobs.lib.chat import render_prompt, stop_token_ids
from jobs.lib.config import Config
from jobs.lib.errors import T2SError
from jobs.lib.models import base_model_path, default_device, load_model, load_tokenizer
from jobs.lib.rundir import RunDir, fresh_staging

# ‖actual − reference‖ / ‖reference‖ on the logits, both computed in fp32. MERGE_TOLERANCE: the rounding of one extra
# add per weight. ROUNDING_TOLERANCE: weights rounded to that dtype (8 bits of mantissa for bf16, 11 for fp16); the
# rounding to bf16 measured 9e-4 on the tiny model after LoRA and 4.6e-3 on SmolLM2-135M-Instruct: far off means a
# broken cast or weights out of the dtype's range.
MERGE_TOLERANCE = 1e-4
ROUNDING_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return float((actual.float() - reference).norm() / reference.norm().clamp_min(1e-12))


def greedy_generation_config(model, tokenizer):
    config = model.generation_config
    config.do_sample = False
    config.temperature = None
    config.top_p = None
    config.top_k = None
    config.max_new_tokens = 256
    config.eos_token_id = stop_token_ids(tokenizer)  # so that a plain model.generate stops at the end of turn
    config.pad_token_id = tokenizer.pad_token_id
    return config


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    return [model(**tokenizer(p, return_tensors="pt").to(model.device)).logits[0] for p in prompts]


def sample_prompts(run: RunDir, tokenizer, n: int) -> list[str]:
    for split in ("validation", "test", "train"):
        path = run.split(split)
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]] if path.is_file() else []
        if rows:
            return [render_prompt(tokenizer, r["context"], r["question"]) for r in rows]
    raise T2SError(f"no prepared rows in {run.data} to verify the merge on: run `t2s prep` again")


def check(cfg: Config, run: RunDir) -> None:
    run.require("train", "merge")


def run(cfg: Config, run: RunDir) -> str:
    from peft import PeftModel

    save_dtype = getattr(torch, cfg.merge.dtype)
    tokenizer = load_tokenizer(str(run.trained_model()))
    prompts = sample_prompts(run, tokenizer, cfg.merge.verify_prompts) if cfg.merge.verify else []
    is_lora = run.trained() == "adapter"
    checks = []
    if is_lora:
        base = load_model(base_model_path(cfg, run), gguf_file=cfg.model.gguf_file, dtype=torch.float32)
        base = base.to(default_device())
        model = PeftModel.from_pretrained(base, str(run.trained_model())).eval()
        reference = prompt_logits(model, tokenizer, prompts)
        model = model.merge_and_unload()
        if prompts:
            error = max(relative_error(m, r) for m, r in zip(prompt_logits(model, tokenizer, prompts), reference))
            if error > MERGE_TOLERANCE:
                raise T2SError(f"merged logits differ from base + adapter by {error:.2e} (> {MERGE_TOLERANCE:.0e} in "
                               f"fp32): the adapter does not match the base {base_model_path(cfg, run)}")
            checks.append(f"logits match base + adapter (rel. error {error:.1e} on {len(prompts)} prompts, fp32)")
    else:  # a full fine-tune: the trained folder is already the whole model
        model = load_model(str(run.trained_model()), dtype=torch.float32).to(default_device()).eval()
        reference = prompt_logits(model, tokenizer, prompts)
        checks.append("full fine-tune, nothing to merge")

    round_weights(model, save_dtype)
    rounding_error = None
    if prompts:
        rounding_error = max(relative_error(m, r) for m, r in zip(prompt_logits(model, tokenizer, prompts), reference))
        if rounding_error > ROUNDING_TOLERANCE[save_dtype]:
            raise T2SError(f"the weights rounded to {cfg.merge.dtype} give logits {rounding_error:.2e} away from "
                           f"fp32's (> {ROUNDING_TOLERANCE[save_dtype]:.0e}): set merge.dtype: float32, or check "
                           "the trained weights for values out of that dtype's range")
        checks.append(f"{cfg.merge.dtype} weights within {rounding_error:.1e} of fp32's logits")
    model = model.to(save_dtype)

    staging = fresh_staging(run.merged)
    model.generation_config = greedy_generation_config(model, tokenizer)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    run.finish("merge", cfg, [(staging, run.merged)], dtype=cfg.merge.dtype, verified=is_lora and bool(prompts),
               rounding_error=rounding_error)
    return "; ".join([f"merged model ({cfg.merge.dtype}) in {run.merged}", *checks])


@torch.no_grad()
def round_weights(model, dtype: torch.dtype) -> None:
    """Rounds every weight (what is saved) to `dtype`, kept in fp32, so that the check measures the rounding alone."""
    for param in model.parameters():
        if param.is_floating_point():
            param.copy_(param.to(dtype))
