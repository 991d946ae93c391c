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


# ---------- candidates for checked decoding (jobs.lib.checked): beam search, a repetition guard, model scores ----------
# Kept apart from the greedy path above: checked decoding takes the greedy answer as its first candidate, and asks
# for these only for the questions whose greedy answer fails its checks.

REPEAT_MAX_PERIOD = 24  # longest block of tokens the guard looks for said again and again
REPEAT_MIN_COPIES = 3  # a block said this many times in a row is a loop, not SQL
REPEAT_MIN_TOKENS = 12  # ...when the copies cover at least this many tokens (a 1-token block must repeat 12 times)


@dataclass
class Candidate:
    text: str
    ended: str  # "eos": the model ended it; "limit": cut at max_new_tokens; "repeats": stopped by the RepetitionGuard
    score: float | None = None  # mean log-probability per token under the model, the end-of-turn token included
    new_tokens: int = 0


def repeats_itself(ids: list[int]) -> bool:
    """Whether the sequence ends in one block of 1..REPEAT_MAX_PERIOD tokens said REPEAT_MIN_COPIES times or more in
    a row, the copies covering REPEAT_MIN_TOKENS tokens or more: a clause a model repeats until its token limit."""
    for period in range(1, REPEAT_MAX_PERIOD + 1):
        span = period * max(REPEAT_MIN_COPIES, -(-REPEAT_MIN_TOKENS // period))
        if len(ids) >= span and all(ids[-span + k] == ids[-span + k % period] for k in range(span)):
            return True
    return False


class RepetitionGuard:
    """A stopping criterion for model.generate: ends each sequence whose generated tokens start repeating themselves
    (repeats_itself), so that a looping candidate stops early instead of keeping its whole batch to max_new_tokens."""

    def __init__(self, prompt_length: int):
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_length:]
        looping = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for period in range(1, REPEAT_MAX_PERIOD + 1):
            copies = max(REPEAT_MIN_COPIES, -(-REPEAT_MIN_TOKENS // period))
            if generated.shape[1] < period * copies:
                break  # longer periods need even more tokens
            tail = generated[:, -period * copies:].reshape(-1, copies, period)
            looping |= (tail == tail[:, :1]).all(dim=2).all(dim=1)
        return looping


def _answer_ids(ids: list[int], stops: list[int], pad_token_id: int | None) -> tuple[list[int], str]:
    """The generated ids up to and including the first stop token (jobs.lib.chat.stop_token_ids; padding after it
    dropped), and how they ended."""
    stop_at = next((k for k, t in enumerate(ids) if t in stops), None)
    if stop_at is not None:
        return ids[:stop_at + 1], "eos"
    while ids and ids[-1] == pad_token_id:  # a beam stopped early, padded to the longest one
        ids = ids[:-1]
    return ids, "repeats" if repeats_itself(ids) else "limit"


@torch.inference_mode()
def generate_candidates(model, tokenizer, prompts: list[str], n: int, batch_size: int,
                        max_new_tokens: int) -> list[list[Candidate]]:
    """Up to `n` different answers to each prompt from a beam search of `n` beams, scored (answer_scores), best
    first. `batch_size` counts sequences: batch_size // n prompts are searched together. Looping beams stop early."""
    from transformers import StoppingCriteriaList

    tokenizer.padding_side = "left"
    stops = stop_token_ids(tokenizer)  # every one: eos alone may not be the token that ends the model's turn
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_call = max(1, batch_size // n)
    found: list[list[tuple[list[int], str]]] = [[] for _ in prompts]
    for start in range(0, len(order), per_call):
        batch = order[start:start + per_call]
        inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
        prompt_length = inputs["input_ids"].shape[1]
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=n,
                                num_return_sequences=n, early_stopping=True, length_penalty=1.0,
                                stopping_criteria=StoppingCriteriaList([RepetitionGuard(prompt_length)]),
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
        for row, ids in enumerate(output[:, prompt_length:].tolist()):
            found[batch[row // n]].append(_answer_ids(ids, stops, tokenizer.pad_token_id))
    results = []
    for prompt_ids, answers in zip(encoded, found):
        distinct: dict[str, tuple[list[int], str]] = {}
        for ids, ended in answers:
            distinct.setdefault(tokenizer.decode(ids, skip_special_tokens=True).strip(), (ids, ended))
        scores = sequence_scores(model, [prompt_ids] * len(distinct), [ids for ids, _ in distinct.values()])
        candidates = [Candidate(text, ended, score, len(ids))
                      for (text, (ids, ended)), score in zip(distinct.items(), scores)]
        results.append(sorted(candidates, key=lambda c: -c.score))
    return results


def answer_scores(model, tokenizer, prompts: list[str], answers: list[Candidate]) -> list[float]:
    """The model's score of answers it gave before (e.g. greedily): mean log-probability per token of the answer's
    text, and of the end-of-turn token when it ended there; the same scale as generate_candidates' scores."""
    end_of_turn = stop_token_ids(tokenizer)[-1]  # the template's end of turn when it has one (listed last), else eos
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    answer_ids = [tokenizer(a.text, add_special_tokens=False)["input_ids"]
                  + ([end_of_turn] if a.ended == "eos" else []) for a in answers]
    return sequence_scores(model, prompt_ids, answer_ids)


@torch.inference_mode()
def sequence_scores(model, prompt_ids: list[list[int]], answer_ids: list[list[int]],
                    batch_size: int = 32) -> list[float]:
    """Mean log-probability per token of each answer after its prompt (an empty answer scores -inf). Left-padded
    batches, with the positions the unpadded sequence would have, and logits kept for the answers' tokens only."""
    scores = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, answers = prompt_ids[start:start + batch_size], answer_ids[start:start + batch_size]
        length = max(len(p) + len(a) for p, a in zip(prompts, answers))
        keep = max(len(a) for a in answers) + 1  # the last prompt token's logits predict the first answer token
        ids = torch.zeros((len(prompts), length), dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, (p, a) in enumerate(zip(prompts, answers)):
            ids[row, length - len(p) - len(a):] = torch.tensor(p + a)
            mask[row, length - len(p) - len(a):] = 1
        inputs = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device),
                  "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0).to(model.device)}
        try:
            logits = model(**inputs, logits_to_keep=keep).logits
        except TypeError:  # a model whose forward cannot keep only the last logits
            logits = model(**inputs).logits
        logits = logits[:, -keep:-1].float()
        normalizer = logits.logsumexp(dim=-1)  # log-probabilities without a second vocabulary-sized tensor
        for row, a in enumerate(answers):
            if not a:
                scores.append(float("-inf"))
                continue
            tail = slice(keep - 1 - len(a), None)
            taken = logits[row, tail].gather(-1, torch.tensor(a, device=logits.device)[:, None])[:, 0]
            scores.append((taken - normalizer[row, tail]).mean().item())
    return scores
