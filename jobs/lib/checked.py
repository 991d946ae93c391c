"""Checked decoding: an answer checks its own SQL before it is given (eval, `t2s ask --decoding checked`, the API).

Greedy decoding returns whatever comes first, even a query that cannot run. Checked decoding tries candidates in
order and answers with the first that passes every check, each of which proves an answer wrong when it fails:
  finished   the model ended it itself: not cut at the token limit, not stopped repeating itself;
  parses     one SQL statement (sqlglot);
  runs       it runs read-only in the sandbox (jobs.lib.sandbox: reading only, time, memory and row limits) on an empty
             database built from the schema: writes, ATTACH, PRAGMA and runaway queries are refused or killed here;
  resolves   it is a query whose every table and column resolves against the schema (sqlglot's qualify);
  runs with rows   it runs on a database of random rows built from the schema by jobs.lib.scoring's generator, seeded with
             the candidate's own literals (never a gold query's: decoding must not see the answer eval scores against).
The candidates: the greedy answer first (most pass, and then cost nothing more); for a question whose greedy answer
fails, a beam search's answers (jobs.lib.candidates.generate_candidates), best model score first, up to `candidates` in
all. When none passes, the best-scored candidate is the answer, marked unchecked. Checks run in sandbox workers in
rounds: every open question's next candidate at once, so the checks of a batch run in parallel and a question stops
at its first passing candidate.
"""

from __future__ import annotations

import functools
import random
import sqlite3
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from sqlglot import exp
from sqlglot.errors import OptimizeError

from jobs.lib import sqlcheck
from jobs.lib.errors import T2SError
from jobs.lib.sandbox import QueryError, QueryFailed, QueryRefused, QueryTimeout, Sandbox, run_readonly, working_on
from jobs.lib.scoring import (STATEMENTS, BuildError, merge_duplicate_tables, planted_values, random_database,
                              table_statements)

if TYPE_CHECKING:  # not imported here: sandbox workers import this module, and must not load torch
    from jobs.lib.generate import Generation

DECODINGS = ("greedy", "checked", "vote")  # vote: jobs.lib.vote
CHECKS = ("finished", "parses", "runs", "resolves", "runs_with_rows")
CHECK_ROWS_PER_TABLE = 8  # rows a table of the filled database gets (as eval's scoring databases)
CHECK_TIMEOUT_S = 1.0  # a query's time limit on the check databases (8 rows a table: a second is very long)
CHECK_ROW_LIMIT = 10_000


@dataclass
class Candidate:
    text: str
    ended: str  # "eos": the model ended it; "limit": cut at max_new_tokens; "repeats": stopped by the RepetitionGuard
    score: float | None = None  # mean log-probability per token under the model, the end-of-turn token included
    new_tokens: int = 0


@dataclass(frozen=True)
class Verdict:
    """What the checks said of one candidate: passed, or the first check it failed and why."""
    passed: bool
    failed: str = ""  # one of CHECKS
    detail: str = ""

    def __str__(self) -> str:
        return "passed every check" if self.passed else f"fails '{self.failed}': {self.detail}"


@dataclass
class Choice:
    """Checked decoding's answer to one question: the chosen candidate, whether it passed, and what was tried."""
    candidate: Candidate
    checked: bool  # False: no candidate passed, this is the best-scored one
    tried: list[tuple[Candidate, Verdict]] = field(default_factory=list)  # in the order they were checked

    @property
    def text(self) -> str:
        return self.candidate.text

    @property
    def why_unchecked(self) -> str:
        """One line: why the answer is unchecked ("" when it passed)."""
        if self.checked:
            return ""
        first = str(self.tried[0][1]) if self.tried else "not checked"
        return (f"none of {len(self.tried)} candidate(s) passed the checks (the first {first})"
                if len(self.tried) > 1 else f"it {first}")


def check_candidates_count(candidates: int) -> int:
    """The candidate count, when it is at least 1; one line otherwise."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise T2SError(f"the candidate count must be a whole number of at least 1 (got {candidates!r}): 1 checks "
                       "the greedy answer only, 4 tries up to three more from a beam search")
    return candidates


def check_decoding(decoding: str) -> str:
    if decoding not in DECODINGS:
        raise T2SError(f"unknown decoding {decoding!r}: use one of {', '.join(DECODINGS)}")
    return decoding


# ---------- the checks (pure but for the sandboxed runs) ----------

def resolution_problem(query: exp.Expression, tables: list[sqlcheck.Table]) -> str | None:
    """Why the query's tables or columns do not resolve against the tables (None when they all do), as sqlglot's
    qualify finds it. A bare double-quoted name that is no column is a string, as SQLite reads it (`name = "Bob"`)."""
    from sqlglot.optimizer.qualify import qualify

    schema = {table.name: {name: type_ or "TEXT" for name, type_ in table.columns} for table in tables}
    known_tables = {name.lower() for name in schema}
    columns = {name.lower() for table in tables for name, _ in table.columns}
    query = query.copy()
    ctes = {cte.alias_or_name.lower() for cte in query.find_all(exp.CTE)}
    read = [table for table in query.find_all(exp.Table) if table.name]
    for table in read:
        if table.name.lower() not in known_tables | ctes:
            return f"no table {table.name} in the schema"
    # A query that reads no table answers nothing about the data, however well it runs: `SELECT COUNT(*) FROM7` is
    # `SELECT COUNT(*) AS FROM7`, which runs everywhere and counts one row.
    if known_tables and not any(table.name.lower() in known_tables for table in read):
        return "it reads no table of the schema (no FROM naming one)"
    for column in list(query.find_all(exp.Column)):
        if sqlcheck.is_quoted_name(column) and column.name.lower() not in columns:
            column.replace(exp.Literal.string(column.name))
    try:
        qualify(query, schema=schema, dialect=sqlcheck.DIALECT, validate_qualify_columns=True, identify=False)
    except OptimizeError as error:
        return str(error).split(". Line:")[0]  # "Column 'x' could not be resolved", "Unknown column: x"
    except (RecursionError, ValueError, KeyError, AttributeError, TypeError):
        return None  # a query qualify cannot follow: the runs decide
    return None


@functools.lru_cache(maxsize=64)  # a question's candidates share their schema
def _tables(context: str) -> tuple[sqlcheck.Table, ...] | None:
    tables = sqlcheck.parse_schema(context)
    return tuple(merge_duplicate_tables(tables)) if tables else None


def _empty_database(tables: tuple[sqlcheck.Table, ...]) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    try:
        for create_sql, _ in table_statements(tables):
            conn.execute(create_sql)
    except sqlite3.Error as error:
        conn.close()
        raise BuildError(f"SQLite cannot create the tables ({error})") from None
    except BuildError:
        conn.close()
        raise
    return conn


def _run(conn: sqlite3.Connection, sql: str, timeout_s: float, row_limit: int) -> str | None:
    """Why the statement does not run on the database (None when it does), in a few words."""
    try:
        run_readonly(conn, sql, timeout_s, row_limit, role="candidate")
    except QueryRefused as error:
        return f"refused by the sandbox: {error}"
    except QueryTimeout as error:
        return f"timed out: {error}"
    except QueryFailed as error:
        return str(error)
    return None


def check_candidate(context: str, text: str, ended: str, seed: int,
                    timeout_s: float = CHECK_TIMEOUT_S, row_limit: int = CHECK_ROW_LIMIT) -> Verdict:
    """Every check of one candidate (its text, and how it ended: Candidate.ended), in CHECKS order, stopping at the
    first that fails. Runs in a sandbox worker (Sandbox.map(check_candidate, ...)): the candidate is parsed and run
    there, never in the job's process."""
    if ended != "eos":
        return Verdict(False, "finished", "it repeats itself" if ended == "repeats" else "cut at the token limit")
    working_on("candidate")  # parsing it: a candidate that hangs the parser is the model's failure
    sql = text.strip()
    statements = sqlcheck.parse_statements(sql)
    if not statements or len(statements) != 1 or not isinstance(statements[0], STATEMENTS):
        return Verdict(False, "parses", "not one SQL statement")
    tables = _tables(context)
    if tables is None:
        return Verdict(False, "runs", "the schema is not CREATE TABLE statements")
    working_on("databases")
    try:
        empty = _empty_database(tables)
    except BuildError as error:
        return Verdict(False, "runs", str(error))
    try:
        problem = _run(empty, sql, timeout_s, row_limit)
    finally:
        empty.close()
    if problem:
        return Verdict(False, "runs", problem)
    working_on("candidate")
    if not isinstance(statements[0], exp.Query):
        return Verdict(False, "resolves", f"a {statements[0].key.upper()} statement is not a query")
    problem = resolution_problem(statements[0], list(tables))
    if problem:
        return Verdict(False, "resolves", problem)
    working_on("databases")
    try:
        filled = random_database(list(tables), planted_values(statements[0], list(tables)), CHECK_ROWS_PER_TABLE,
                                 random.Random(seed))
    except BuildError as error:
        return Verdict(False, "runs_with_rows", str(error))
    try:
        problem = _run(filled, sql, timeout_s, row_limit)
    finally:
        filled.close()
    return Verdict(False, "runs_with_rows", problem) if problem else Verdict(True)


def verdict_after_kill(task: tuple, error: QueryError) -> Verdict:
    """check_candidate's verdict for a task the Sandbox killed (past its time limit) or lost (out of memory)."""
    what = "timed out" if isinstance(error, QueryTimeout) else "failed"
    if error.role == "candidate":
        return Verdict(False, "runs", f"{what} and its worker was killed: {error}")
    doing = {"databases": "building the check databases"}.get(error.role, "checking it")
    return Verdict(False, "runs", f"{what} while {doing}: {error}")


def first_candidate(generation: Generation) -> Candidate:
    """The greedy answer as a candidate; ended_at_eos None (not recorded) counts as finished."""
    ended = "limit" if generation.ended_at_eos is False else "eos"
    return Candidate(generation.text, ended, None, generation.new_tokens)


def by_score(candidates: list[Candidate]) -> list[Candidate]:
    """Best score first; equal scores keep their order, and an unscored candidate counts lowest."""
    return sorted(candidates, key=lambda c: (c.score is None, -(c.score or 0.0)))


def best_scored(candidates: list[Candidate]) -> Candidate:
    return by_score(candidates)[0]


# ---------- the rounds ----------

Search = Callable[[list[int]], "list[list[Candidate]]"]


def choose_answers(contexts: list[str], greedy: list[Generation], search: Search, sandbox: Sandbox, *,
                   candidates: int, timeout_s: float = CHECK_TIMEOUT_S, row_limit: int = CHECK_ROW_LIMIT,
                   seed: int = 0) -> list[Choice]:
    """Checked decoding's answer to each question, given its schema and greedy answer. `search(indices)` gives more
    candidates for those questions: the greedy answer (now scored) first, then others; it is called once, for the
    questions whose greedy answer fails, only when `candidates` > 1. The others are checked best-scored first."""
    check_candidates_count(candidates)
    queues = [[first_candidate(g)] for g in greedy]
    choices: list[Choice | None] = [None] * len(greedy)
    tried: list[list[tuple[Candidate, Verdict]]] = [[] for _ in greedy]
    searched = False
    while True:
        open_questions = [i for i, choice in enumerate(choices) if choice is None and queues[i]]
        if not open_questions and (searched or candidates == 1):
            break
        if not open_questions:  # every greedy answer was checked: search for those that failed
            searched = True
            failed = [i for i, choice in enumerate(choices) if choice is None]
            if failed:
                for i, found in zip(failed, search(failed)):
                    first, *others = found
                    tried[i][0] = (first, tried[i][0][1])  # the same answer, now with its score
                    seen, fresh = {first.text.strip()}, []
                    for candidate in by_score(others):
                        if candidate.text.strip() not in seen:  # the same answer again: checked once
                            seen.add(candidate.text.strip())
                            fresh.append(candidate)
                    queues[i] = fresh[:candidates - 1]
            continue
        batch = [(i, queues[i].pop(0)) for i in open_questions]
        tasks = [(contexts[i], c.text, c.ended, seed + i, timeout_s, row_limit) for i, c in batch]
        for (i, candidate), verdict in zip(batch, sandbox.map(check_candidate, tasks, verdict_after_kill)):
            tried[i].append((candidate, verdict))
            if verdict.passed:
                choices[i] = Choice(candidate, True, tried[i])
    for i, choice in enumerate(choices):
        if choice is None:
            choices[i] = Choice(best_scored([c for c, _ in tried[i]]), False, tried[i])
    return choices
