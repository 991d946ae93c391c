"""Vote decoding: answers chosen by what they return (eval.decoding: vote, `t2s ask --decoding vote`, the API).

For each question: the greedy answer plus N sampled ones (the same N counts every sample, repeats included: a repeat is
a vote). Each distinct candidate runs read-only in the sandbox (jobs.lib.sandbox) on a few databases generated from the
schema by jobs.lib.scoring's generator, seeded with the literals of all the question's candidates (never a gold query's:
decoding must not see the answer eval scores against), the same databases for every candidate. Candidates are grouped
by the rows they return (as multisets; in order when the candidate orders them); the largest group wins, a tie goes to
the group with the best model score (mean log-probability per token, jobs.lib.generate), and within the winning group the
best-scored candidate is the answer. A candidate that fails to run (not one query, an error, refused, past a limit)
never wins; when every candidate fails, the greedy answer is given, marked not voted.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jobs.lib import sqlcheck
from jobs.lib.checked import Candidate
from jobs.lib.sandbox import QueryError, Sandbox, run_readonly, working_on

if TYPE_CHECKING:  # not imported here: sandbox workers import this module, and must not load torch
    from jobs.lib.generate import Generation

VOTE_DATABASES = 2
VOTE_ROWS_PER_TABLE = 8
VOTE_TIMEOUT_S = 1.0
VOTE_ROW_LIMIT = 10_000
SAMPLES = 8
TEMPERATURE = 0.7


@dataclass
class Vote:
    """Vote decoding's answer to one question."""
    candidate: Candidate
    voted: bool  # False: no candidate ran, this is the greedy answer
    votes: int  # candidates (repeats included) that returned its rows
    candidates: int  # candidates in all, the greedy one included

    @property
    def text(self) -> str:
        return self.candidate.text


# ---------- the choice (pure) ----------

def pick(signatures: list[str | None], scores: list[float | None]) -> int | None:
    """The winning candidate's index: from the largest group of equal signatures (None: failed to run, never wins),
    ties broken by the group's best score, then the best-scored member (the earliest on equal scores)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, signature in enumerate(signatures):
        if signature is not None:
            groups[signature].append(index)
    if not groups:
        return None

    def score(index: int) -> float:
        value = scores[index]
        return float("-inf") if value is None else value

    winners = max(groups.values(), key=lambda members: (len(members), max(score(i) for i in members)))
    return max(winners, key=lambda i: (score(i), -i))


# ---------- running the candidates (in a sandbox worker) ----------

@functools.lru_cache(maxsize=16)  # a question's candidates share their databases
def _databases_plan(context: str, texts: tuple[str, ...]):
    """(tables, planted values) for a question: its schema, and the literals of every candidate that parses."""
    from jobs.lib.checked import _tables
    from jobs.lib.scoring import Planted, planted_values

    tables = _tables(context)
    if tables is None:
        return None, {}
    planted: dict[str, Planted] = defaultdict(lambda: Planted([], []))
    for text in texts:
        query = sqlcheck.single_query(text.strip())
        if query is None:
            continue
        for column, values in planted_values(query, list(tables)).items():
            planted[column].hits.extend(v for v in values.hits if v not in planted[column].hits)
            planted[column].misses.extend(v for v in values.misses if v not in planted[column].misses)
    return tables, dict(planted)


def result_signature(context: str, texts: tuple[str, ...], index: int, seed: int,
                     databases: int = VOTE_DATABASES, timeout_s: float = VOTE_TIMEOUT_S,
                     row_limit: int = VOTE_ROW_LIMIT) -> str | None:
    """Runs in a Sandbox worker: a digest of the rows candidate `index` returns on the question's databases, or None
    when it is not one query or does not run on them."""
    from jobs.lib.scoring import BuildError, comparable, random_database

    working_on("candidate")
    query = sqlcheck.single_query(texts[index].strip())
    if query is None:
        return None
    working_on("databases")
    tables, planted = _databases_plan(context, texts)
    if tables is None:
        return None
    ordered = query.args.get("order") is not None
    results = []
    for d in range(databases):
        try:
            conn = random_database(list(tables), planted, VOTE_ROWS_PER_TABLE, random.Random(f"{seed}/{d}"))
        except BuildError:
            return None
        try:
            rows = [comparable(row) for row in run_readonly(conn, texts[index].strip(), timeout_s, row_limit,
                                                            role="candidate").rows]
        except QueryError:
            return None
        finally:
            conn.close()
        results.append(rows if ordered else sorted(rows, key=repr))
    return hashlib.sha256(repr(results).encode()).hexdigest()


def failed_to_run(task: tuple, error: QueryError) -> None:
    """result_signature's result for a candidate whose worker the Sandbox killed or lost: it did not run."""
    return None


def choose_by_votes(contexts: list[str], candidates: list[list[Candidate]], sandbox: Sandbox, *,
                    timeout_s: float = VOTE_TIMEOUT_S, row_limit: int = VOTE_ROW_LIMIT, seed: int = 0) -> list[Vote]:
    """Vote decoding's answer to each question from its candidates (the greedy one first, repeats kept): each distinct
    candidate runs once, in the sandbox's workers, all questions at once."""
    tasks, owners = [], []
    distinct_per_question = []
    for q, (context, found) in enumerate(zip(contexts, candidates)):
        distinct = tuple(dict.fromkeys(c.text.strip() for c in found))
        distinct_per_question.append(distinct)
        for j in range(len(distinct)):
            tasks.append((context, distinct, j, seed + q, VOTE_DATABASES, timeout_s, row_limit))
            owners.append((q, distinct[j]))
    signature_of: dict[tuple[int, str], str | None] = {}
    for owner, signature in zip(owners, sandbox.map(result_signature, tasks, failed_to_run)):
        signature_of[owner] = signature
    votes = []
    for q, found in enumerate(candidates):
        signatures = [signature_of[(q, c.text.strip())] for c in found]
        winner = pick(signatures, [c.score for c in found])
        if winner is None:
            votes.append(Vote(found[0], False, 0, len(found)))
        else:
            votes.append(Vote(found[winner], True, signatures.count(signatures[winner]), len(found)))
    return votes


# ---------- the candidates (the model) ----------

def sample_candidates(model, tokenizer, prompts: list[str], n: int, batch_size: int, max_new_tokens: int,
                      temperature: float = TEMPERATURE, seed: int = 0) -> list[list[Candidate]]:
    """`n` sampled answers to each prompt (repeats kept: each is a vote), scored like jobs.lib.generate's candidates.
    `batch_size` counts sequences: batch_size // n prompts are sampled together."""
    import torch

    from jobs.lib.chat import stop_token_ids
    from jobs.lib.candidates import _answer_ids, sequence_scores

    tokenizer.padding_side = "left"
    stops = stop_token_ids(tokenizer)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    per_call = max(1, batch_size // n)
    found: list[list[tuple[list[int], str]]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    with torch.inference_mode():
        for start in range(0, len(order), per_call):
            batch = order[start:start + per_call]
            inputs = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(model.device)
            length = inputs["input_ids"].shape[1]
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                    top_p=1.0, top_k=0, num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=stops)
            for row, ids in enumerate(output[:, length:].tolist()):
                found[batch[row // n]].append(_answer_ids(ids, stops, tokenizer.pad_token_id))
    results = []
    for prompt_ids, answers in zip(encoded, found):
        texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids, _ in answers]
        distinct = {}
        for text, (ids, _) in zip(texts, answers):
            distinct.setdefault(text, ids)
        scores = dict(zip(distinct, sequence_scores(model, [prompt_ids] * len(distinct), list(distinct.values()))))
        results.append([Candidate(text, ended, scores[text], len(ids)) for text, (ids, ended) in zip(texts, answers)])
    return results


def vote_with_model(model, tokenizer, prompts: list[str], contexts: list[str], greedy: list[Generation],
                    sandbox: Sandbox, *, samples: int, batch_size: int, max_new_tokens: int,
                    temperature: float = TEMPERATURE, timeout_s: float = VOTE_TIMEOUT_S,
                    row_limit: int = VOTE_ROW_LIMIT) -> list[Vote]:
    """Vote decoding end to end, given the greedy answers: sample, score the greedy answers, vote."""
    from dataclasses import replace

    from jobs.lib.checked import first_candidate
    from jobs.lib.candidates import answer_scores

    first = [first_candidate(g) for g in greedy]
    scores = answer_scores(model, tokenizer, prompts, first)
    sampled = sample_candidates(model, tokenizer, prompts, samples, batch_size, max_new_tokens, temperature)
    candidates = [[replace(f, score=s), *others] for f, s, others in zip(first, scores, sampled)]
    return choose_by_votes(contexts, candidates, sandbox, timeout_s=timeout_s, row_limit=row_limit)


def vote_summary(votes_record: list[dict]) -> dict:
    """What voting did for a model's answers: shares of questions."""
    n = len(votes_record) or 1
    return {"voted": sum(v["voted"] for v in votes_record) / n,
            "greedy_outvoted": sum(v["greedy_outvoted"] for v in votes_record) / n}


# ---------- eval's use ----------

VOTE = "+vote"  # the label suffix of a model's vote-decoding row in eval's report


def eval_vote_answers(cfg, run, rows: list[dict], label: str, which: str, variant: str, folder, greedy: list,
                      greedy_s: float, sandbox: Sandbox, generation_key: dict) -> tuple[list, float, list[dict]]:
    """Vote decoding's answers for eval, from the model's greedy ones: as Generations to score, the seconds they took
    in all (greedy_s, the sampling and the votes; loading the model left out, as greedy's load is), and what the vote
    said of each. Saved in `folder` like eval's other answers (under eval's generation_key and the vote's settings),
    and reused by a rerun with the same key."""
    import dataclasses
    import json
    import time

    import torch

    from jobs.lib.chat import render_prompt
    from jobs.lib.generate import Generation
    from jobs.lib.models import default_device, load_run_model
    from jobs.lib.rundir import write_atomic

    path = folder / f"{label.replace(':', '-')}{VOTE}.json"
    key = json.loads(json.dumps({**generation_key, "decoding": "vote", "samples": cfg.eval.vote_samples,
                                 "temperature": cfg.eval.vote_temperature, "greedy_s": greedy_s,
                                 "checks": [cfg.eval.query_timeout_s, cfg.eval.row_limit]}))
    try:
        saved = json.loads(path.read_text())
        if saved["key"] == key:
            print(f"  {label}{VOTE}: reusing the answers an interrupted eval saved in {path}", flush=True)
            return [Generation(**g) for g in saved["generations"]], saved["generation_s"], saved["votes"]
    except (OSError, ValueError, KeyError, TypeError):  # none saved, or by another version of t2s: vote again
        pass
    model, tokenizer = load_run_model(cfg, run, which)
    model = model.to(default_device()).eval()
    started = time.perf_counter()
    prompts = [render_prompt(tokenizer, r["context"], r["question"], variant) for r in rows]
    votes = vote_with_model(model, tokenizer, prompts, [r["context"] for r in rows], greedy, sandbox,
                            samples=cfg.eval.vote_samples, batch_size=cfg.eval.batch_size,
                            max_new_tokens=cfg.eval.max_new_tokens, temperature=cfg.eval.vote_temperature,
                            timeout_s=cfg.eval.query_timeout_s, row_limit=cfg.eval.row_limit)
    extra_s = time.perf_counter() - started
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    generations = [Generation(v.text, v.candidate.new_tokens, g.latency_s + extra_s, v.candidate.ended == "eos")
                   for v, g in zip(votes, greedy)]
    record = [{"voted": v.voted, "votes": v.votes, "vote_candidates": v.candidates,
               "greedy_outvoted": v.text.strip() != g.text.strip()} for v, g in zip(votes, greedy)]
    write_atomic(path, json.dumps({"key": key, "generation_s": greedy_s + extra_s, "votes": record,
                                   "generations": [dataclasses.asdict(g) for g in generations]}, ensure_ascii=False))
    return generations, greedy_s + extra_s, record
