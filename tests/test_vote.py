"""jobs.lib.vote: the largest group of equal results wins, ties by model score; a candidate that fails never wins."""

from __future__ import annotations

import pytest

from jobs.lib.checked import Candidate
from jobs.lib.sandbox import Sandbox
from jobs.lib.vote import choose_by_votes, pick

CONTEXT = "CREATE TABLE singer (name VARCHAR, age INTEGER)"


def test_the_largest_group_wins_over_a_better_scored_minority():
    assert pick(["a", "b", "b"], [-0.1, -2.0, -3.0]) == 1  # b's two votes beat a's better score; b's best member
    assert pick(["a", "b", "b", "a"], [-0.1, -2.0, -3.0, -5.0]) == 0  # a tie: the group with the best score
    assert pick([None, "b"], [0.0, -9.0]) == 1  # a candidate that fails never wins, whatever its score
    assert pick([None, None], [0.0, 0.0]) is None
    assert pick(["a", "a"], [None, -1.0]) == 1  # an unscored candidate counts lowest


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2) as pool:
        yield pool


def test_votes_group_candidates_by_the_rows_they_return(sandbox):
    minority = Candidate("SELECT name FROM singer WHERE age >= 30", "eos", -0.1)  # the model's favourite
    majority = [Candidate("SELECT name FROM singer WHERE age > 30", "eos", -1.0),
                Candidate("select name from singer where 30 < age", "eos", -1.5),  # other text, same rows
                Candidate("SELECT name FROM singer WHERE age > 30", "eos", -1.0)]  # a repeat is a vote too
    failing = Candidate("SELECT nickname FROM singer", "eos", 0.0)
    [vote] = choose_by_votes([CONTEXT], [[minority, *majority, failing]], sandbox)
    assert vote.voted and vote.votes == 3 and vote.candidates == 5
    assert vote.text == "SELECT name FROM singer WHERE age > 30"


def test_when_nothing_runs_the_greedy_answer_is_given_unvoted(sandbox):
    greedy = Candidate("SELECT nickname FROM singer", "eos", -0.5)
    bomb = Candidate("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
                     "eos", 0.0)
    [vote] = choose_by_votes([CONTEXT], [[greedy, bomb, Candidate("The answer is 3.", "eos", 0.0)]], sandbox,
                             timeout_s=0.3)
    assert not vote.voted and vote.text == greedy.text and vote.votes == 0


@pytest.mark.slow
def test_eval_shows_vote_beside_greedy_and_checked_in_every_bucket(copy_run):
    import json

    from tests.conftest import t2s

    run, config = copy_run(eval={"models": ["merged"], "decoding": "vote", "vote_samples": 3, "max_examples": 6})
    for job in ("train", "merge", "eval"):
        result = t2s(job, "--config", str(config))
        assert result.returncode == 0, result.stderr
    report = json.loads((run / "eval" / "report.json").read_text())
    assert list(report["results"]) == ["merged", "merged+checked", "merged+vote"]
    vote = report["results"]["merged+vote"]
    assert vote["decoding"] == "vote" and vote["samples"] == 3 and 0 <= vote["voted"] <= 1
    assert set(report["buckets"]["merged+vote"]) == set(report["buckets"]["merged"])
    assert "| merged+vote | vote, greedy + 3 samples |" in (run / "eval" / "report.md").read_text()
