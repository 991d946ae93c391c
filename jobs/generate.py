"""Batched greedy generation with the model's chat template: left padding, length-sorted batches, stop at the end of turn.

Shared by eval (a whole split) and ask (a few questions). Prompts are exactly the prefix the model was
trained on (jobs.chat.render_prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from jobs.chat import stop_token_ids


@dataclass
class Generation:
    text: str
    new_tokens: int
    latency_s: float  # the batch's wall time: what a caller of that batch waited
    ended_at_eos: bool | None = None  # True: the model stopped itself; False: cut at max_new_tokens


@torch.inference_mode()
def generate_batched(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                     progress: bool = False) -> list[Generation]:
    """Greedy answers to `prompts`, in their order. Sorting by length keeps padding (wasted work) small."""
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    stops = stop_token_ids(tokenizer)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress, mininterval=2):
        inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
        started = time.perf_counter()
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        new = output[:, inputs["input_ids"].shape[1]:]
        for row, index in enumerate(batch):
            ids = new[row].tolist()
            eos_at = next((k for k, t in enumerate(ids) if t in stops), None)
            length = len(ids) if eos_at is None else eos_at + 1
            text = tokenizer.decode(ids[:length], skip_special_tokens=True)
            results[index] = Generation(text=text.strip(), new_tokens=length, latency_s=elapsed,
                                        ended_at_eos=eos_at is not None)
    return results
