"""Checked decoding's further candidates (jobs.lib.checked): a beam search on the model, a guard that stops a beam
repeating itself, and the model's score of an answer (mean log-probability per token).

Kept apart from greedy generation (jobs.lib.generate): checked decoding takes the greedy answer as its first candidate,
and asks for these only for the questions whose greedy answer fails its checks. Apart from jobs.lib.checked too: that
module's checks run in sandbox workers, which must not load torch.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from jobs.lib.chat import stop_token_ids
from jobs.lib.checked import Candidate, first_candidate
from jobs.lib.generate import Generation


REPEAT_MAX_PERIOD = 24  # longest block of tokens the guard looks for said again and again
REPEAT_MIN_COPIES = 3  # a block said this many times in a row is a loop, not SQL
REPEAT_MIN_TOKENS = 12  # ...when the copies cover at least this many tokens (a 1-token block must repeat 12 times)


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


def search_with_model(model, tokenizer, prompts: list[str], greedy: list[Generation], candidates: int,
                      batch_size: int, max_new_tokens: int) -> list[list[Candidate]]:
    """choose_answers' search, with a model: for each prompt its greedy answer scored, then the answers of a beam
    search of `candidates` beams (generate_candidates), best-scored first."""
    first = [first_candidate(g) for g in greedy]
    scores = answer_scores(model, tokenizer, prompts, first)
    beams = generate_candidates(model, tokenizer, prompts, candidates, batch_size, max_new_tokens)
    return [[replace(f, score=score), *others] for f, score, others in zip(first, scores, beams)]
