"""Checked decoding (jobs.lib.checked): the checks exactly, the choice among hand-made candidates, hostile candidates
through the real sandbox, the repetition guard, the model's scores, and the tiny model end to end."""

from __future__ import annotations

import json
import random

import pytest
import torch

from jobs.lib import checked
from jobs.lib.candidates import (RepetitionGuard, _answer_ids, answer_scores, generate_candidates, repeats_itself,
                                  sequence_scores)
from jobs.lib.checked import (Candidate, Choice, Verdict, check_candidate, choose_answers, resolution_problem,
                              verdict_after_kill)
from jobs.lib.errors import T2SError
from jobs.lib.generate import Generation
from jobs.lib.sandbox import Sandbox
from jobs.lib.sqlcheck import parse_schema, single_query
from tests.conftest import shared_path

SONGS = "CREATE TABLE songs (title VARCHAR, artist VARCHAR, year INTEGER)"
TWO = "CREATE TABLE singer (id INTEGER, name VARCHAR); CREATE TABLE song (singer_id INTEGER, title VARCHAR)"
FOREVER = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT COUNT(*) FROM c"
PRINTF_BOMB = " UNION ALL ".join(["SELECT printf('%.*c', 2147483647, 'x')"] * 6)
HOSTILE = {  # candidate -> what stops it
    "DELETE FROM songs": "refused by the sandbox: DELETE songs is not allowed",
    "ATTACH DATABASE 'stolen.db' AS x": "refused by the sandbox: ATTACH stolen.db is not allowed",
    "DROP TABLE songs": "refused by the sandbox: DELETE sqlite_master is not allowed",  # how SQLite asks for it
    "PRAGMA writable_schema = 1": "refused by the sandbox: PRAGMA writable_schema is not allowed",
    "SELECT load_extension('evil')": "refused by the sandbox: load_extension() is not allowed",
    FOREVER: "timed out: ran past 0.3 s",
    PRINTF_BOMB: "timed out and its worker was killed: ran past 0.3 s",
}


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2) as sandbox:
        yield sandbox


def verdicts(sandbox, context: str, texts: list[str], ended: str = "eos") -> list[Verdict]:
    tasks = [(context, text, ended, seed, 0.3) for seed, text in enumerate(texts)]
    return list(sandbox.map(check_candidate, tasks, verdict_after_kill))


# ---------- the checks ----------

@pytest.mark.parametrize("sql, problem", [
    ("SELECT title FROM songs WHERE year > 2000", None),
    ('SELECT title FROM songs WHERE artist = "Bob"', None),  # a double-quoted value SQLite reads as a string
    ("SELECT s.name, COUNT(*) FROM singer AS s JOIN song AS t ON s.id = t.singer_id GROUP BY s.name", None),
    ("WITH top AS (SELECT name FROM singer) SELECT name FROM top", None),
    ("SELECT name FROM singer WHERE id IN (SELECT singer_id FROM song WHERE title = 'x')", None),
    ("SELECT Name FROM SINGER", None),  # SQLite's names are case-insensitive
    ("SELECT titel FROM songs", "Column 'titel' could not be resolved"),
    ("SELECT title FROM songz", "no table songz in the schema"),
    ("SELECT s.age FROM singer AS s", "Unknown column: age"),
    ("SELECT name FROM singer JOIN song ON singer.id = song.singer AND 1", "Unknown column: singer"),
    # issue 31: `FROM7` is an alias (SELECT COUNT(*) AS FROM7), so it ran and resolved, and was marked checked
    ("SELECT COUNT(*) FROM7", "it reads no table of the schema (no FROM naming one)"),
    ("SELECT 1", "it reads no table of the schema (no FROM naming one)"),
    ("WITH x AS (SELECT 1 AS a) SELECT a FROM x", "it reads no table of the schema (no FROM naming one)"),
])
def test_resolution_against_the_schema(sql, problem):
    tables = parse_schema(SONGS + "; " + TWO)
    assert resolution_problem(single_query(sql), tables) == problem


def test_resolution_agrees_with_sqlite_on_every_validation_gold_query():
    """The schema check must not reject a query SQLite runs: on all 1,090 validation rows it rejects exactly the gold
    queries SQLite rejects on the rows' own tables (the dataset's 7 broken ones)."""
    import sqlite3

    from jobs.lib.scoring import merge_duplicate_tables, table_statements

    rows = [json.loads(line) for line in shared_path("data", "sql-create-context", "validation.jsonl").open()]
    disagree = []
    for row in rows:
        tables = merge_duplicate_tables(parse_schema(row["context"]))
        conn = sqlite3.connect(":memory:")
        for create, _ in table_statements(tuple(tables)):
            conn.execute(create)
        try:
            conn.execute(row["answer"])
            runs = True
        except sqlite3.Error:
            runs = False
        if (resolution_problem(single_query(row["answer"]), tables) is None) != runs:
            disagree.append(row["answer"])
    assert disagree == [] and len(rows) == 1090


def test_each_check_can_fail(sandbox):
    texts = ["SELECT title FROM songs WHERE year > 2000", "SELECT name FROM songs", "SELECT title FROM songs; SELECT 1",
             "Sure! SELECT title FROM songs", "SELECT year / 0 FROM songs",
             "SELECT abs(-9223372036854775808) FROM songs", "SELECT title FROM songs WHERE \"name\" = 'x'"]
    got = [(v.passed, v.failed, v.detail) for v in verdicts(sandbox, SONGS, texts)]
    assert got == [
        (True, "", ""),
        (False, "runs", "no such column: name"),
        (False, "parses", "not one SQL statement"),
        (False, "parses", "not one SQL statement"),
        (True, "", ""),  # SQLite divides by zero into NULL
        (False, "runs_with_rows", "integer overflow"),  # only rows show it
        (True, "", ""),  # "name" is no column: a string, as SQLite reads it
    ]
    assert verdicts(sandbox, SONGS, ["SELECT title FROM songs"], ended="limit")[0] == Verdict(
        False, "finished", "cut at the token limit")
    assert verdicts(sandbox, SONGS, ["SELECT title FROM songs"], ended="repeats")[0] == Verdict(
        False, "finished", "it repeats itself")
    # a table SQLite cannot create: no candidate can run, so none passes
    assert verdicts(sandbox, "CREATE TABLE sqlite_x (a INTEGER)", ["SELECT a FROM sqlite_x"])[0].failed == "runs"


def test_hostile_candidates_are_refused_by_the_sandbox(sandbox, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an ATTACH would create its file
    got = verdicts(sandbox, SONGS, list(HOSTILE))
    assert [(v.passed, v.failed, v.detail) for v in got] == [(False, "runs", why) for why in HOSTILE.values()]
    assert list(tmp_path.iterdir()) == []


# ---------- the choice, with hand-made candidates ----------

def greedy(*texts: str, ended_at_eos: bool | None = True) -> list[Generation]:
    return [Generation(text, 5, 0.01, ended_at_eos) for text in texts]


def candidate(text: str, score: float, ended: str = "eos") -> Candidate:
    return Candidate(text, ended, score, 5)


class FakeSearch:
    """Hand-made candidates per question (the greedy one scored first, then the others), recording the calls."""

    def __init__(self, *per_question: list[Candidate]):
        self.per_question, self.calls = per_question, []

    def __call__(self, indices: list[int]) -> list[list[Candidate]]:
        self.calls.append(indices)
        return [self.per_question[i] for i in indices]


def test_a_candidate_with_an_unknown_column_is_skipped_for_the_next(sandbox):
    search = FakeSearch(
        [candidate("SELECT name FROM songs", -0.1), candidate("SELECT name FROM songs", -0.2),  # the same again
         candidate("SELECT titel FROM songs", -0.3), candidate("SELECT title FROM songs", -0.4),
         candidate("SELECT artist FROM songs", -0.5)],
        [], [])
    choices = choose_answers([SONGS] * 3, greedy("SELECT name FROM songs", "SELECT COUNT(*) FROM songs",
                                                 "SELECT artist FROM songs"), search, sandbox, candidates=4)
    assert [c.text for c in choices] == ["SELECT title FROM songs", "SELECT COUNT(*) FROM songs",
                                         "SELECT artist FROM songs"]
    assert [c.checked for c in choices] == [True, True, True]
    assert search.calls == [[0]]  # only the question whose greedy answer failed is searched
    first = choices[0]
    assert [(c.text, v.passed) for c, v in first.tried] == [  # the duplicate is not checked again
        ("SELECT name FROM songs", False), ("SELECT titel FROM songs", False), ("SELECT title FROM songs", True)]
    assert first.tried[0][0].score == -0.1  # the greedy answer carries the score the search gave it
    assert [len(c.tried) for c in choices] == [3, 1, 1] and first.why_unchecked == ""


def test_the_best_scored_passing_candidate_wins_and_the_count_is_a_cap(sandbox):
    search = FakeSearch([candidate("SELECT name FROM songs", -2.0), candidate("SELECT year FROM songs", -0.5),
                         candidate("SELECT title FROM songs", -0.2), candidate("SELECT artist FROM songs", -0.1)])
    [choice] = choose_answers([SONGS], greedy("SELECT name FROM songs"), search, sandbox, candidates=4)
    assert choice.text == "SELECT artist FROM songs"  # all three pass: the best-scored wins
    assert [c.text for c, _ in choice.tried] == ["SELECT name FROM songs", "SELECT artist FROM songs"]
    [choice] = choose_answers([SONGS], greedy("SELECT name FROM songs"),
                              FakeSearch([candidate("SELECT name FROM songs", -2.0),
                                          candidate("SELECT titel FROM songs", -0.5),
                                          candidate("SELECT title FROM songs", -0.6)]), sandbox, candidates=2)
    assert (choice.text, choice.checked, len(choice.tried)) == ("SELECT titel FROM songs", False, 2)  # 2 in all


def test_when_no_candidate_passes_the_best_scored_is_returned_marked_unchecked(sandbox):
    search = FakeSearch([candidate("SELECT name FROM songs", -0.9), candidate("SELECT titel FROM songs", -0.3),
                         candidate("SELECT title FROM songz", -0.6), candidate("Sure! Here it is", -1.5)])
    [choice] = choose_answers([SONGS], greedy("SELECT name FROM songs"), search, sandbox, candidates=4)
    assert (choice.text, choice.checked) == ("SELECT titel FROM songs", False)
    assert [v.failed for _, v in choice.tried] == ["runs", "runs", "runs", "parses"]
    assert choice.why_unchecked == ("none of 4 candidate(s) passed the checks (the first fails 'runs': no such "
                                    "column: name)")


def test_hostile_candidates_never_win(sandbox, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hostile = [candidate(text, -0.01 * rank) for rank, text in enumerate(HOSTILE)]
    search = FakeSearch([candidate("DELETE FROM songs", 0.0), *hostile, candidate("SELECT title FROM songs", -5.0)],
                        [candidate("DELETE FROM songs", 0.0), *hostile])
    choices = choose_answers([SONGS] * 2, greedy("DELETE FROM songs", "DELETE FROM songs"), search, sandbox,
                             candidates=len(HOSTILE) + 2, timeout_s=0.3)
    assert (choices[0].text, choices[0].checked) == ("SELECT title FROM songs", True)  # the only harmless one wins
    assert choices[1].checked is False  # all hostile: the best-scored is returned, marked, never checked as passed
    assert all(not verdict.passed for choice in choices for c, verdict in choice.tried if c.text in HOSTILE)
    assert list(tmp_path.iterdir()) == []


def test_an_unfinished_greedy_answer_fails_and_one_count_never_searches(sandbox):
    def no_search(indices):
        raise AssertionError("searched with candidates=1")

    choices = choose_answers([SONGS] * 2, greedy("SELECT title FROM songs", "SELECT title FROM songs WHERE",
                                                 ended_at_eos=False), no_search, sandbox, candidates=1)
    assert [(c.checked, c.why_unchecked) for c in choices] == [(False, "it fails 'finished': cut at the token "
                                                                       "limit")] * 2
    choices = choose_answers([SONGS], greedy("SELECT title FROM songs", ended_at_eos=None), no_search, sandbox,
                             candidates=1)
    assert choices[0].checked  # an answer whose ending was not recorded counts as finished


@pytest.mark.parametrize("count", [0, -1, 2.5, True, "4"])
def test_a_candidate_count_below_one_is_one_line(count):
    with pytest.raises(T2SError, match=r"the candidate count must be a whole number of at least 1") as caught:
        checked.check_candidates_count(count)
    assert "\n" not in str(caught.value)
    with pytest.raises(T2SError, match="unknown decoding 'beam': use one of greedy, checked, vote"):
        checked.check_decoding("beam")


def test_choice_helpers():
    a, b, c = candidate("a", -1.0), candidate("b", -0.5), Candidate("c", "eos", None, 1)
    assert checked.best_scored([c, a, b]) is b and checked.best_scored([c]) is c
    assert checked.best_scored([a, candidate("a2", -1.0)]) is a  # the earlier of equal scores
    assert checked.first_candidate(Generation("x", 3, 0.1, False)) == Candidate("x", "limit", None, 3)
    assert Choice(a, True).why_unchecked == "" and Choice(a, False).why_unchecked == "it not checked"


# ---------- the repetition guard ----------

@pytest.mark.parametrize("ids, looping", [
    ([7] * 11, False), ([7] * 12, True),  # a one-token block must repeat 12 times
    ([1, 2] * 6, True), ([1, 2] * 5 + [1], False),
    ([5, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], True),  # 4 copies of 3 tokens
    ([1, 2, 3, 4, 5, 6] * 2, False), ([1, 2, 3, 4, 5, 6] * 3, True),  # 2 copies are not a loop; 3 are
    (list(range(40)), False), ([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 9], False),  # it stopped repeating
])
def test_repeats_itself(ids, looping):
    assert repeats_itself(ids) is looping
    assert RepetitionGuard(prompt_length=2)(torch.tensor([[0, 0] + ids])).tolist() == [looping]


def test_the_guard_agrees_with_repeats_itself_on_random_sequences():
    rng = random.Random(0)
    rows = [[rng.choice([1, 2, 3]) for _ in range(rng.randint(0, 40))] for _ in range(400)]
    rows += [r[:5] + [4, 5, 6] * rng.randint(1, 6) for r in rows[:100]]
    for length in {len(r) for r in rows}:
        same = [r for r in rows if len(r) == length]
        flags = RepetitionGuard(prompt_length=1)(torch.tensor([[0] + r for r in same])).tolist()
        assert flags == [repeats_itself(r) for r in same]


class LoopAfter:
    """A logits processor that makes the model say `block` again and again after its first `free` tokens."""

    def __init__(self, prompt_length: int, free: int, block: list[int]):
        self.prompt_length, self.free, self.block = prompt_length, free, block

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step >= self.free:
            forced = self.block[(step - self.free) % len(self.block)]
            scores = torch.full_like(scores, -1e4)
            scores[:, forced] = 0.0
        return scores


@pytest.mark.parametrize("beams", [1, 3])
def test_the_guard_ends_a_looping_candidate_in_generate(prepared_run, beams):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList, StoppingCriteriaList

    model = AutoModelForCausalLM.from_pretrained(prepared_run / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(prepared_run / "base")
    encoded = tokenizer(["<|user|>\nHow many heads?</s>\n<|assistant|>\n"], return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    length = inputs["input_ids"].shape[1]
    block = [30, 31, 32]
    settings = dict(max_new_tokens=60, do_sample=False, num_beams=beams, num_return_sequences=beams,
                    logits_processor=LogitsProcessorList([LoopAfter(length, 4, block)]),
                    pad_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    unguarded = model.generate(**inputs, **settings)[:, length:]
    guarded = model.generate(**inputs, **settings,
                             stopping_criteria=StoppingCriteriaList([RepetitionGuard(length)]))[:, length:]
    assert unguarded.shape[1] == 60
    assert guarded.shape[1] == 4 + 12  # 4 free tokens, then 4 copies of the 3-token block: stopped there
    for ids in guarded.tolist():
        assert _answer_ids(ids, [tokenizer.eos_token_id], 0)[1] == "repeats" and ids[-12:] == block * 4


def test_answer_ids_say_how_a_candidate_ended():
    stops, pad = [2, 4], 0  # eos and the template's end of turn
    assert _answer_ids([5, 6, 2, 0, 0], stops, pad) == ([5, 6, 2], "eos")
    assert _answer_ids([5, 6, 4, 2, 0], stops, pad) == ([5, 6, 4], "eos")  # the end of turn ends it too
    assert _answer_ids([5, 6, 7, 0, 0], stops, pad) == ([5, 6, 7], "limit")
    assert _answer_ids([9] + [7] * 12 + [0], stops, pad) == ([9] + [7] * 12, "repeats")


class _WrittenBeams:
    """A model stand-in whose every beam 'writes' fixed tokens and whose logits are flat: what generate_candidates
    asks generate to stop at, and where it cuts each candidate, are tested on their own."""

    device = torch.device("cpu")

    def __init__(self, new_tokens: list[int], vocabulary: int):
        self.new_tokens, self.vocabulary, self.scored = new_tokens, vocabulary, []

    def generate(self, input_ids, attention_mask, max_new_tokens, num_return_sequences, eos_token_id, **_):
        self.eos_token_id = eos_token_id
        rows = input_ids.repeat_interleave(num_return_sequences, dim=0)
        return torch.cat([rows, torch.tensor([self.new_tokens[:max_new_tokens]] * len(rows))], dim=1)

    def __call__(self, input_ids, logits_to_keep, **_):
        self.scored.extend(input_ids.tolist())
        return type("Output", (), {"logits": torch.zeros(len(input_ids), logits_to_keep, self.vocabulary)})


def test_candidates_end_at_the_templates_end_of_turn_even_when_the_tokenizer_names_another_eos():
    from tests.test_stopping import _chatml_tokenizer_with_the_wrong_eos

    tokenizer = _chatml_tokenizer_with_the_wrong_eos()  # eos <s>, turns end in </s>, as SmolLM2 on transformers 5.17
    end_of_turn = tokenizer.convert_tokens_to_ids("</s>")
    sql = tokenizer("SELECT 1", add_special_tokens=False)["input_ids"]
    model = _WrittenBeams(sql + [end_of_turn] + tokenizer("\nSELECT 2", add_special_tokens=False)["input_ids"] * 5,
                          len(tokenizer))
    (candidates,) = generate_candidates(model, tokenizer, ["<|user|>\nq</s>\n<|assistant|>\n"], n=2, batch_size=2,
                                        max_new_tokens=30)
    assert [(c.text, c.ended, c.new_tokens) for c in candidates] == [("SELECT 1", "eos", len(sql) + 1)]
    assert end_of_turn in model.eos_token_id  # the beam search itself stops there, not only the bookkeeping
    assert model.scored[-1][-len(sql) - 1:] == sql + [end_of_turn]
    # a greedy answer that ended itself is scored with the end of turn, as the beam search's candidates are
    model.scored.clear()
    answer_scores(model, tokenizer, ["<|user|>\nq</s>\n<|assistant|>\n"], [Candidate("SELECT 1", "eos")])
    assert model.scored[0][-len(sql) - 1:] == sql + [end_of_turn]


# ---------- the model's scores and candidates, on the tiny model ----------

@pytest.fixture(scope="module")
def tiny(prepared_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(prepared_run / "base").eval(),
            AutoTokenizer.from_pretrained(prepared_run / "base"))


def test_sequence_scores_in_a_padded_batch_equal_each_sequence_alone(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(p)["input_ids"] for p in ("<|user|>\nHow many?</s>\n<|assistant|>\n",
                                                   "<|system|>\nCREATE TABLE t (a INTEGER)</s>\n<|user|>\nList every "
                                                   "a above three please</s>\n<|assistant|>\n")]
    answers = [tokenizer("SELECT COUNT(*) FROM t", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
               tokenizer("SELECT a", add_special_tokens=False)["input_ids"]]
    batched = sequence_scores(model, prompts, answers)
    for prompt, answer, score in zip(prompts, answers, batched):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
        alone = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(answer)[:, None]).mean().item()
        assert score == pytest.approx(alone, abs=1e-4)
    assert batched[0] != pytest.approx(batched[1])


def test_generate_candidates_are_distinct_scored_and_best_first(tiny):
    model, tokenizer = tiny
    prompts = ["<|system|>\nCREATE TABLE t (a INTEGER)</s>\n<|user|>\nHow many?</s>\n<|assistant|>\n",
               "<|user|>\nList them</s>\n<|assistant|>\n", "<|user|>\nAnd the rest?</s>\n<|assistant|>\n"]
    found = generate_candidates(model, tokenizer, prompts, n=3, batch_size=4, max_new_tokens=10)
    assert len(found) == 3
    for prompt, candidates in zip(prompts, found):
        assert 1 <= len(candidates) <= 3 and len({c.text for c in candidates}) == len(candidates)
        assert [c.score for c in candidates] == sorted((c.score for c in candidates), reverse=True)
        assert all(c.ended in ("eos", "limit", "repeats") and 0 < c.new_tokens <= 10 for c in candidates)
    # alone, a prompt gets the same candidates as in a batch
    alone = generate_candidates(model, tokenizer, prompts[1:2], n=3, batch_size=3, max_new_tokens=10)[0]
    assert [c.text for c in alone] == [c.text for c in found[1]]


def test_the_checks_load_no_torch_in_a_sandbox_worker():
    """Workers import jobs.lib.checked to run check_candidate under their memory cap: torch would not fit there."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    probe = "import sys, jobs.lib.checked; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("override, expected", [
    ("eval.candidates=0", "config key 'eval.candidates' in --set eval.candidates: Input should be greater than or equal to 1"),
    ("eval.candidates=2.5", "config key 'eval.candidates'"),
    ("eval.decoding=beam",
     "config key 'eval.decoding' in --set eval.decoding: Input should be 'greedy', 'checked' or 'vote'"),
])
def test_eval_settings_of_checked_decoding_are_one_line(override, expected):
    from jobs.lib.config import load_config

    assert (load_config(None).eval.decoding, load_config(None).eval.candidates) == ("checked", 4)
    with pytest.raises(T2SError, match=expected) as caught:
        load_config(None, [override])
    assert "\n" not in str(caught.value)
