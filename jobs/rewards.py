"""The rewards `t2s rl` trains with: small pure functions of what the sandbox found out about one completion.

A completion is judged once (`judge`, in a jobs.lib.sandbox worker: it is parsed and run there, never in the trainer's
process): whether it is SQL only (exactly one statement that parses, nothing else) and how it fared against the gold
query on eval's generated databases (jobs.lib.scoring.execution_match: same time, row and memory limits). Then
  execution   1 when it returns the gold query's rows on every database, else 0
  sql_only    1 when it is one SQL query and nothing else, else 0
  ended       1 when the model ended it itself (an end-of-turn token), not cut at the completion length, else 0
A completion the sandbox had to stop (past its time limit or a size limit, refused, or its worker killed: a printf or
recursive-CTE bomb) is hostile and earns 0 from every reward. trl weighs them with rl.reward_weights and logs each one's mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from jobs.lib import sqlcheck
from jobs.lib.errors import T2SError
from jobs.lib.sandbox import QueryError, QueryTimeout, Sandbox, working_on

REWARDS = ("execution", "sql_only", "ended")
# outcomes where the sandbox had to stop the completion (pred_killed: its worker died, e.g. out of memory)
STOPPED = ("pred_timeout", "pred_refused", "pred_killed")
# SQLite errors that mean a limit stopped the query (a printf bomb meets SQLITE_LIMIT_LENGTH), not a plain mistake
LIMIT_ERRORS = ("too big", "row limit", "exceeds", "out of memory")


@dataclass(frozen=True)
class Judgement:
    """What the sandbox found out about one completion."""
    sql_only: bool
    execution: str  # one of jobs.lib.scoring.OUTCOMES, or pred_killed
    detail: str = ""

    @property
    def hostile(self) -> bool:
        """The sandbox had to stop it: a time, size or memory limit, or something besides reading."""
        return self.execution in STOPPED or (
            self.execution == "pred_error" and any(words in self.detail for words in LIMIT_ERRORS))


# ---------- the rewards (pure) ----------

def execution_reward(judgement: Judgement) -> float:
    return 1.0 if judgement.execution == "match" else 0.0


def sql_only_reward(judgement: Judgement) -> float:
    return 1.0 if judgement.sql_only and not judgement.hostile else 0.0


def ended_reward(ended_itself: bool, judgement: Judgement) -> float:
    return 1.0 if ended_itself and not judgement.hostile else 0.0


def ended_itself(completion_ids: Sequence[int], stop_ids: Sequence[int]) -> bool:
    """Whether the completion's last token is an end-of-turn token (trl keeps it; a cut completion lacks it)."""
    return bool(completion_ids) and completion_ids[-1] in stop_ids


# ---------- judging (in a sandbox worker) ----------

def judge(context: str, gold_sql: str, completion: str, seed: int, databases: int, rows_per_table: int,
          timeout_s: float, row_limit: int) -> Judgement:
    """Runs in a Sandbox worker: SQL-only, then (for SQL) execution against the gold query."""
    from jobs.lib.scoring import execution_match

    working_on("answer")  # parsing it: a completion that hangs the parser is the model's failure
    sql_only = sqlcheck.is_sql_only(completion)
    # run even when not a query alone: one statement that writes is refused there, so hostile like a bomb
    result = execution_match(context, gold_sql, completion, databases=databases, rows_per_table=rows_per_table,
                             seed=seed, timeout_s=timeout_s, row_limit=row_limit)
    return Judgement(sql_only, result.outcome, result.detail)


def judgement_after_kill(task: tuple, error: QueryError) -> Judgement:
    """judge's verdict for a task whose worker the Sandbox killed or lost: stopped, so hostile, whatever it was doing
    (but a gold query or database build that ran away is the example's fault: not scored against the completion)."""
    if error.role == "gold":
        return Judgement(False, "gold_error")
    if error.role == "databases":
        return Judgement(False, "build_error")
    return Judgement(False, "pred_timeout" if isinstance(error, QueryTimeout) else "pred_killed", str(error))


@dataclass
class RewardSettings:
    databases: int = 2
    rows_per_table: int = 8
    timeout_s: float = 1.0
    row_limit: int = 10_000


class Rewards:
    """The reward functions trl calls (one per name in REWARDS, each given a batch's completions and the dataset's
    context, gold and seed columns), sharing one judgement per completion: a batch is judged once, in the
    sandbox's workers, whichever function asks first."""

    def __init__(self, sandbox: Sandbox, stop_ids: Sequence[int], settings: RewardSettings = RewardSettings()):
        self.sandbox, self.stop_ids, self.settings = sandbox, list(stop_ids), settings
        self._last: tuple[tuple, list[Judgement]] | None = None

    def judgements(self, contexts: Sequence[str], golds: Sequence[str], completions: Sequence[str],
                   seeds: Sequence[int]) -> list[Judgement]:
        key = (tuple(contexts), tuple(golds), tuple(completions), tuple(seeds))
        if self._last is None or self._last[0] != key:
            s = self.settings
            tasks = [(c, g, text, int(seed), s.databases, s.rows_per_table, s.timeout_s, s.row_limit)
                     for c, g, text, seed in zip(contexts, golds, completions, seeds)]
            self._last = (key, list(self.sandbox.map(judge, tasks, judgement_after_kill)))
        return self._last[1]

    def functions(self, names: Sequence[str] = REWARDS) -> list[Callable]:
        """trl's reward functions for `names` (of REWARDS), named so that its logs say which is which."""

        def make(name: str) -> Callable:
            def reward(prompts, completions, context, gold, seed, completion_ids=None, **_) -> list[float]:
                judged = self.judgements(context, gold, [as_text(c) for c in completions], seed)
                if name == "execution":
                    return [execution_reward(j) for j in judged]
                if name == "sql_only":
                    return [sql_only_reward(j) for j in judged]
                if completion_ids is None:  # an older trl that does not pass the token ids
                    raise T2SError("the installed trl does not give reward functions the completions' token ids, "
                                   "which the 'ended' reward needs: set rl.reward_weights.ended: 0")
                return [ended_reward(ended_itself(ids, self.stop_ids), j) for ids, j in zip(completion_ids, judged)]

            reward.__name__ = name
            return reward

        return [make(name) for name in names]


def as_text(completion) -> str:
    """A completion as text: trl passes a string for a plain-text prompt, a list of messages for a chat one."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
