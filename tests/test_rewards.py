"""jobs.rewards: each reward exactly, judged in the sandbox; a hostile completion earns 0 within the time limit."""

from __future__ import annotations

import time

import pytest

from jobs.rewards import (Judgement, RewardSettings, Rewards, ended_itself, ended_reward, execution_reward,
                          sql_only_reward)
from jobs.lib.sandbox import KILL_GRACE_S, Sandbox

CONTEXT = "CREATE TABLE singer (name VARCHAR, age INTEGER)"
GOLD = "SELECT name FROM singer WHERE age > 30"
STOP = 2  # the end-of-turn token id in these tests
TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def rewards():
    with Sandbox(workers=2) as sandbox:
        yield Rewards(sandbox, [STOP], RewardSettings(databases=2, rows_per_table=8, timeout_s=TIMEOUT_S))


def scored(rewards: Rewards, completion: str, ids=(5, STOP)) -> dict[str, float]:
    """Each reward function's value for one completion, called as trl calls them."""
    functions = rewards.functions()
    return {f.__name__: f(prompts=["p"], completions=[completion], completion_ids=[list(ids)], context=[CONTEXT],
                          gold=[GOLD], seed=[0])[0] for f in functions}


def test_the_gold_query_earns_every_reward(rewards):
    assert scored(rewards, GOLD) == {"execution": 1.0, "sql_only": 1.0, "ended": 1.0}
    assert scored(rewards, "select name from singer where age > 30;")["execution"] == 1.0  # same rows, other spelling


def test_a_wrong_result_earns_no_execution_reward(rewards):
    assert scored(rewards, "SELECT name FROM singer WHERE age >= 30") == {"execution": 0.0, "sql_only": 1.0,
                                                                         "ended": 1.0}
    assert scored(rewards, "SELECT age FROM singer WHERE age > 30")["execution"] == 0.0


def test_two_statements_or_prose_are_not_sql_only(rewards):
    assert scored(rewards, f"{GOLD}; SELECT 1") == {"execution": 0.0, "sql_only": 0.0, "ended": 1.0}
    assert scored(rewards, f"Here is the query: {GOLD}")["sql_only"] == 0.0


def test_a_completion_cut_at_the_length_limit_has_not_ended(rewards):
    assert scored(rewards, GOLD, ids=(5, 6, 7))["ended"] == 0.0
    assert scored(rewards, GOLD, ids=(5, 6, 7))["execution"] == 1.0


@pytest.mark.parametrize("bomb", [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "SELECT printf('%.*c', 2000000000, 'x') FROM singer",
    "DELETE FROM singer",
])
def test_a_hostile_completion_earns_nothing_within_the_time_limit(rewards, bomb):
    started = time.monotonic()
    assert scored(rewards, bomb) == {"execution": 0.0, "sql_only": 0.0, "ended": 0.0}
    assert time.monotonic() - started < TIMEOUT_S * 2 + KILL_GRACE_S + 3  # two databases, plus start-up slack


def test_a_batch_is_judged_once_for_all_three_rewards(rewards):
    calls = []
    original = rewards.sandbox.map
    rewards.sandbox.map = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        scored(rewards, "SELECT name FROM singer")
    finally:
        rewards.sandbox.map = original
    assert len(calls) == 1


def test_the_pure_rewards():
    match, wrong = Judgement(True, "match"), Judgement(True, "mismatch")
    assert (execution_reward(match), execution_reward(wrong)) == (1.0, 0.0)
    assert (sql_only_reward(wrong), sql_only_reward(Judgement(False, "not_sql"))) == (1.0, 0.0)
    assert sql_only_reward(Judgement(True, "pred_timeout")) == 0.0
    assert sql_only_reward(Judgement(True, "pred_error", "string or blob too big")) == 0.0
    assert sql_only_reward(Judgement(True, "pred_error", "no such column: x")) == 1.0  # a mistake, not hostile
    assert ended_reward(True, wrong) == 1.0 and ended_reward(False, match) == 0.0
    assert ended_reward(True, Judgement(True, "pred_refused")) == 0.0
    assert ended_itself([4, STOP], [STOP]) and not ended_itself([4, 5], [STOP]) and not ended_itself([], [STOP])
