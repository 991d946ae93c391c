"""merge: the adapter folded into the full-precision base (never into a 4-bit model), saved as safetensors
with tokenizer, chat template and a greedy generation config, and checked: the merged model's logits must
equal base + adapter's on sample prompts.
"""

from __future__ import annotations

import json

import torch

from jobs.chat import render_prompt
from jobs.config import Config
from jobs.errors import T2SError
from jobs.models import base_model_path, load_model, load_tokenizer, pick_dtype
from jobs.rundir import RunDir, fresh_staging, replace_dir

# ‖merged − reference‖ / ‖reference‖ on the logits: rounding of one extra add per weight, by dtype.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


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
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


@torch.no_grad()
def prompt_logits(model, tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    return [model(**tokenizer(p, return_tensors="pt").to(model.device)).logits[0] for p in prompts]


def sample_prompts(run: RunDir, tokenizer, n: int) -> list[str]:
    for split in ("validation", "test", "train"):
        path = run.data / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n]] if path.is_file() else []
        if rows:
            return [render_prompt(tokenizer, r["context"], r["question"]) for r in rows]
    raise T2SError(f"no prepared rows in {run.data} to verify the merge on: run `t2s prep` again")


def run(cfg: Config, run: RunDir) -> str:
    from peft import PeftModel

    run.require("train", "merge")
    dtype = pick_dtype(cfg.model.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(run.adapter))
    is_lora = (run.adapter / "adapter_config.json").is_file()
    if is_lora:
        base = load_model(base_model_path(cfg, run), gguf_file=cfg.model.gguf_file, dtype=dtype).to(device)
        model = PeftModel.from_pretrained(base, str(run.adapter)).eval()
        check = ""
        if cfg.merge.verify:
            prompts = sample_prompts(run, tokenizer, cfg.merge.verify_prompts)
            reference = prompt_logits(model, tokenizer, prompts)
        model = model.merge_and_unload()
        if cfg.merge.verify:
            error = max(relative_error(m, r) for m, r in zip(prompt_logits(model, tokenizer, prompts), reference))
            if error > TOLERANCE[dtype]:
                raise T2SError(f"merged logits differ from base + adapter by {error:.2e} (> {TOLERANCE[dtype]:.0e} "
                               f"for {dtype}): the adapter does not match the base {base_model_path(cfg, run)}")
            check = f"; logits match base + adapter (rel. error {error:.1e} on {len(prompts)} prompts)"
    else:  # a full fine-tune: the trained folder is already the whole model
        model = load_model(str(run.adapter), dtype=dtype)
        check = "; full fine-tune, nothing to merge"

    staging = fresh_staging(run.merged)
    model.generation_config = greedy_generation_config(model, tokenizer)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    replace_dir(staging, run.merged)
    run.mark_done("merge", dtype=str(dtype), verified=is_lora and cfg.merge.verify)
    return f"merged model ({dtype}) in {run.merged}{check}"


if __name__ == "__main__":
    from jobs.cli import job_main

    job_main("merge")
