"""Batched greedy generation with the model's chat template: left padding, length-sorted batches, stop at the end of
turn.

Shared by eval (a whole split) and ask (a few questions). Prompts are exactly the prefix the model was
trained on (jobs.lib.chat.render_prompt).

Two ways to decode, the same answers (chosen once per model in a process; T2S_DECODER overrides the choice):
  cudagraph  a static KV cache, each decode step a CUDA graph replayed per token (jobs.lib.static_decoding): the default
             on a GPU, where transformers' generate is bound by its per-step host time
  compiled   cudagraph with the decode step's forward compiled by torch.compile (T2S_DECODER=compiled): fewer,
             fused kernels per token, for a compilation of tens of seconds per shape (so not the default)
  static     the same loop with eager steps (T2S_DECODER=static): how the CPU tests check it against generate
  dynamic    transformers' generate with its dynamic cache: the default on a CPU, and the fallback wherever the
             static decoder fails (one line says why) or does not apply
"""

from __future__ import annotations

import os
import sys
import time
import weakref
from dataclasses import dataclass

import torch

from jobs.lib.chat import stop_token_ids
from jobs.lib.config import DECODERS
from jobs.lib.errors import T2SError, first_line



@dataclass
class Generation:
    text: str
    new_tokens: int
    latency_s: float  # the batch's wall time: what a caller of that batch waited
    ended_at_eos: bool | None = None  # True: the model stopped itself; False: cut at max_new_tokens


def requested_decoder() -> str:
    decoder = os.environ.get("T2S_DECODER", "auto").strip().lower() or "auto"
    if decoder not in DECODERS:
        raise T2SError(f"T2S_DECODER={decoder!r} is not a decoder: use one of {', '.join(DECODERS)}")
    return decoder


# One decoder per model, for as long as the model lives: its CUDA graphs are captured once and reused by every batch.
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model, decoder: str | None = None):
    """The model's decoder: a jobs.lib.static_decoding.StaticDecoder, or None for transformers' generate. `decoder`
    (one of DECODERS) overrides T2S_DECODER for this call, e.g. to time both in one process."""
    from jobs.lib import static_decoding

    wanted = decoder or requested_decoder()
    if wanted == "auto":
        wanted = "cudagraph" if model.device.type == "cuda" else "dynamic"
    cached = _decoders.get(model)
    if wanted == "dynamic" or (cached is not None and cached.info.fallback):  # a failed model stays on generate
        return None
    if cached is not None and cached.info.backend == wanted:
        return cached
    if wanted == "cudagraph" and model.device.type != "cuda":
        raise T2SError(f"T2S_DECODER=cudagraph needs the model on a GPU (it is on {model.device}): use static or "
                       "dynamic on a CPU")
    reason = static_decoding.why_not_static(model)
    fresh = static_decoding.StaticDecoder(model, wanted)
    _decoders[model] = fresh
    if reason:
        give_up(fresh, reason)
        return None
    return fresh


def give_up(decoder, reason: str) -> None:
    """The model goes back to transformers' generate for the rest of the process, with one line saying why."""
    decoder.info.fallback = reason
    decoder.buckets.clear()
    print(f"t2s: fast decoding ({decoder.info.backend}) is off for this model ({reason}); decoding with "
          "transformers' generate instead", file=sys.stderr, flush=True)


def decoding_info(model) -> dict:
    """What decoded this model so far in this process: backend, compile_s (CUDA graph captures, all buckets),
    graphs, fallback."""
    decoder = _decoders.get(model)
    if decoder is None:
        return {"backend": "dynamic", "compile_s": 0.0, "graphs": 0, "fallback": None}
    info = decoder.info
    backend = "dynamic" if info.fallback else info.backend
    return {"backend": backend, "compile_s": round(info.compile_s, 3), "graphs": info.graphs,
            "fallback": info.fallback}


def generate_dynamic(model, inputs, max_new_tokens: int, stop_ids: list[int], pad_token_id: int) -> torch.Tensor:
    """transformers' greedy generate (dynamic cache): [rows, new tokens], a row ending at any of stop_ids."""
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=pad_token_id, eos_token_id=stop_ids)
    return output[:, inputs["input_ids"].shape[1]:]


def generate_tokens(model, decoder, inputs, max_new_tokens: int, stop_ids: list[int],
                    pad_token_id: int) -> torch.Tensor:
    """New token ids per row, by the model's decoder; by generate when there is none or it fails."""
    if decoder is not None and not decoder.info.fallback:
        try:
            return decoder.generate(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens,
                                    stop_ids, pad_token_id)
        except Exception as error:  # a failed capture or an unsupported model never fails the job
            give_up(decoder, first_line(error) or type(error).__name__)
    return generate_dynamic(model, inputs, max_new_tokens, stop_ids, pad_token_id)


@torch.inference_mode()
def generate_batched(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                     progress: bool = False, decoder: str | None = None) -> list[Generation]:
    """Greedy answers to `prompts`, in their order. Sorting by length keeps padding (wasted work) small.
    `decoder` (one of DECODERS) overrides T2S_DECODER."""
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    stops = stop_token_ids(tokenizer)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[Generation | None] = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    chosen = decoder_for(model, decoder) if prompts else None
    for batch in tqdm(batches, desc="generating", disable=None if progress else True,  # None: on a terminal only
                      mininterval=2):
        inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
        started = time.perf_counter()
        new = generate_tokens(model, chosen, inputs, max_new_tokens, stops, tokenizer.pad_token_id)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        for row, index in enumerate(batch):
            ids = new[row].tolist()
            eos_at = next((k for k, t in enumerate(ids) if t in stops), None)
            length = len(ids) if eos_at is None else eos_at + 1
            text = tokenizer.decode(ids[:length], skip_special_tokens=True)
            results[index] = Generation(text=text.strip(), new_tokens=length, latency_s=elapsed,
                                        ended_at_eos=eos_at is not None)
    return results
