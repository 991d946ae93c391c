"""jobs.vote: the largest group of equal results wins, ties by model score; a candidate that fails never wins."""

from __future__ import annotations

import pytest

from jobs.generate import Candidate
from jobs.sandbox import Sandbox
from jobs.vote import choose_by_votes, pick

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
