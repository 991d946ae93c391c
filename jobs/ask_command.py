"""`t2s ask`: the command over jobs.ask's Python API: reads the questions (an argument, stdin, --questions JSONL) and
the tables (--schema, --schema-file, --db), prints one answer a question (a line, SQL and its rows with --run, or
--json), and says what went wrong in one line. The model, the prompt and the decoding are jobs.ask's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from jobs import ask
from jobs.ask import (CANDIDATES, MAX_NEW_TOKENS, Answer, NotSQLError, SQLGenerator, checked_pairs, checked_schema,
                      checked_text, checked_timeout, json_line)
from jobs.lib import checked, sandbox
from jobs.lib.errors import T2SError, one_line_errors, printable
from jobs.lib.sandbox import QueryRows


# ---------- input and output ----------

def questions_from_lines(text: str) -> list[str]:
    """One question per non-empty line."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def questions_from_jsonl(text: str, where: str, default_context: str | None) -> list[tuple[str, str]]:
    """(context, question) per JSON line `{"question": ..., "context"|"schema": ...}`; a line without its own
    context gets `default_context` (from --schema, --schema-file or --db)."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise T2SError(f"{where} line {number}: not JSON ({error.msg}); write one object a line") from None
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or not item["question"].strip():
            raise T2SError(f"{where} line {number}: needs a \"question\" string, e.g. "
                           "{\"question\": \"How many songs?\", \"context\": \"CREATE TABLE songs (title VARCHAR)\"}")
        context = item.get("context", item.get("schema"))
        if context is None:
            if default_context is None:
                raise T2SError(f"{where} line {number}: no \"context\" and no --schema, --schema-file or --db to "
                               "fall back on")
            context = default_context
        elif not isinstance(context, str):
            raise T2SError(f"{where} line {number}: \"context\" must be a string of CREATE TABLE statements")
        else:
            context = checked_schema(checked_text(context, f"{where} line {number}: the context"),
                                     f"{where} line {number}: the context")
        question = checked_text(item["question"], f"{where} line {number}: the question").strip()
        checked_pairs([(context, question)], lambda _: f"{where} line {number}: ")
        pairs.append((context, question))
    if not pairs:
        raise T2SError(f"{where} holds no questions: write one JSON object a line with a \"question\"")
    return pairs


def answer_line(sql: str) -> str:
    """An answer as exactly one line, for batches ("line N answers question N"): backslashes doubled, then line
    breaks and control characters written as backslash escapes (\\n, \\x1b), so the exact text can be read back."""
    return printable(sql.replace("\\", "\\\\"))


def format_table(result: QueryRows) -> str:
    """Rows as aligned text columns (NULL for None) under a header when names are known, then a row count. Values
    and names are printable: a line break or an escape sequence in a value cannot break the table or the terminal."""
    cells = [["NULL" if value is None else printable(str(value)) for value in row] for row in result.rows]
    columns = [printable(str(name)) for name in result.columns] if result.columns else None
    result = QueryRows(columns, result.rows)
    lines = [*([result.columns] if result.columns else []), *cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))] if lines else []

    def render(line: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()

    out = [render(result.columns), render(["-" * w for w in widths])] if result.columns else []
    out += [render(line) for line in cells]
    out.append(f"({len(result.rows)} row{'' if len(result.rows) == 1 else 's'})")
    return "\n".join(out)


def answer_record(answer: Answer, result: QueryRows | None = None, error: str | None = None) -> dict:
    """The --json object of one answer."""
    record = {"question": answer.question, "sql": answer.text, "sql_only": answer.sql_only,
              "latency_ms": round(answer.latency_ms, 1)}
    if answer.checked is not None:
        record.update(checked=answer.checked, candidates_tried=answer.candidates_tried)
        if not answer.checked:
            record["why_unchecked"] = answer.why_unchecked
    if result is not None:
        record["columns"] = result.columns
        record["rows"] = [list(row) for row in result.rows]
    if error is not None:
        record["error"] = error
    return record


# ---------- the command ----------

def process_age_s() -> float | None:
    """Seconds since this process started (from Linux's /proc), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def timing_line(generator: SQLGenerator, started_s: float | None, answered_s: float | None) -> str:
    """--verbose: where the time to the first answer went (start-up, model load, decoding, graph capture)."""
    from jobs.lib.generate import decoding_info

    decoding = decoding_info(generator.model)
    answers = sum(generator.answer_s)
    captured = (f"; {decoding['graphs']} CUDA graph{'' if decoding['graphs'] == 1 else 's'} captured in "
                f"{decoding['compile_s']:.2f} s" if decoding["graphs"] else "")
    fallback = f"; fell back: {decoding['fallback']}" if decoding["fallback"] else ""
    parts = [f"ready to load after {started_s:.2f} s" if started_s is not None else None,
             f"model loaded in {generator.load_s:.2f} s (torch, transformers, weights, {generator.model.device})",
             f"answered in {answers:.2f} s by the {decoding['backend']} decoder{captured}{fallback}",
             f"first answer {answered_s:.2f} s after the process started" if answered_s is not None else None]
    return "timing: " + "; ".join(part for part in parts if part)

def _error(message: str) -> None:
    print(f"t2s ask: error: {printable(message)}", file=sys.stderr, flush=True)


def _warn(message: str) -> None:
    print(f"t2s ask: warning: {printable(message)}", file=sys.stderr, flush=True)


def _read_file(path: Path, what: str) -> str:
    if not path.is_file():
        raise T2SError(f"{path}: no such file; pass {what} an existing file")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise T2SError(f"{path}: cannot be read as text ({error}); pass {what} a UTF-8 text file") from None


def default_context(schema: str | None, schema_file: Path | None, db: Path | None) -> str | None:
    """The CREATE TABLE context from whichever of --schema, --schema-file and --db was given (at most one)."""
    given = [name for name, value in (("--schema", schema), ("--schema-file", schema_file), ("--db", db))
             if value is not None]
    if len(given) > 1:
        raise T2SError(f"{' and '.join(given)} both give the tables: pass only one of them")
    if schema is not None:
        return checked_schema(checked_text(schema, "--schema"), "--schema")
    if schema_file is not None:
        return checked_schema(_read_file(schema_file, "--schema-file"), f"--schema-file {schema_file}")
    if db is not None:
        return checked_schema(sandbox.schema_from_sqlite(db), f"the tables of {db}")
    return None


def read_stdin(stdin) -> str:
    """stdin's text; one line when it is not UTF-8 (Python would otherwise pass the bad bytes on as surrogates)."""
    data = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise T2SError(f"stdin is not UTF-8 text (byte {error.start}): pipe in one question a line, as UTF-8") from None


def read_pairs(question: str | None, questions_file: Path | None, context: str | None,
               stdin) -> tuple[list[tuple[str, str]], bool]:
    """((context, question) pairs, whether they are a batch) from the argument, stdin or a JSONL file."""
    if question is not None and questions_file is not None:
        raise T2SError("both a question and --questions given: pass one or the other")
    if questions_file is not None:
        return questions_from_jsonl(_read_file(questions_file, "--questions"), str(questions_file), context), True
    if question is not None and question != "-":
        question = checked_text(question, "the question")
        questions, batch = [question.strip()] if question.strip() else [], False
    elif question == "-" or not stdin.isatty():
        questions, batch = questions_from_lines(read_stdin(stdin)), True
    else:
        questions, batch = [], False
    if not questions:
        raise T2SError("no question given: pass one as an argument, `-` to read one a line from stdin, "
                       "or --questions file.jsonl")
    if context is None:
        raise T2SError("no tables given: pass --schema \"CREATE TABLE ...\", --schema-file schema.sql or "
                       "--db file.sqlite")
    return [(context, q) for q in questions], batch


def answer_all(generator: SQLGenerator, pairs: list[tuple[str, str]], batch: bool, *, batch_size: int,
               db: Path | None, execute: bool, as_json: bool, timeout_s: float, row_limit: int,
               verbose: bool = False, started_s: float | None = None) -> bool:
    """Prints every answer (one line each, or SQL and its rows with --run); True when all went through. In a batch,
    line N is the answer to question N (answer_line: one line, whatever the model wrote). `verbose` adds where the
    time went on stderr (`started_s`: the process's age when loading the model began)."""
    ok = True
    answers = generator.answers(pairs, batch_size)
    if verbose:
        print(f"t2s ask: {timing_line(generator, started_s, process_age_s())}", file=sys.stderr, flush=True)
    for number, answer in enumerate(answers, start=1):
        where = f"question {number}: " if batch else ""
        result = error = None
        if not answer.sql_only:
            error = str(NotSQLError(answer.text))
        elif execute:
            try:
                result = ask.run_on_database(db, answer.text, timeout_s, row_limit)
            except T2SError as failure:
                error = str(failure)
        if as_json:
            print(json_line(answer_record(answer, result, error)), flush=True)
            continue
        if answer.sql_only:
            print(answer_line(answer.text) if batch else printable(answer.text, multiline=True), flush=True)
        elif batch:
            print(flush=True)  # keeps line N the answer to question N
        if answer.checked is False and answer.sql_only:
            _warn(f"{where}the answer is unchecked: {answer.why_unchecked}")
        if result is not None:
            print(format_table(result) + ("\n" if batch else ""), flush=True)
        if error is not None:
            _error(where + error)
            ok = False
    return ok


def ask_command(
    question: Optional[str] = typer.Argument(None, help="The question; `-` (or a pipe) reads one a line from stdin."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A run directory (its merged model; before "
                                        "t2s merge, base + adapter), a model folder or a Hub id."),
    schema: Optional[str] = typer.Option(None, "--schema", help="The CREATE TABLE statements the question is about."),
    schema_file: Optional[Path] = typer.Option(None, "--schema-file", help="A file of CREATE TABLE statements."),
    db: Optional[Path] = typer.Option(None, "--db", help="A SQLite file: its tables are the schema."),
    run: bool = typer.Option(False, "--run", help="Execute the SQL on --db, read-only, and print the rows."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object a question: question, sql, sql_only, "
                                                       "latency_ms (columns, rows with --run; error; checked, "
                                                       "candidates_tried, why_unchecked with checked decoding). "
                                                       "Problems with an answer go in its object, exit code 0. "
                                                       "SQLite's infinite numbers are the strings \"Infinity\" and "
                                                       "\"-Infinity\"."),
    questions_file: Optional[Path] = typer.Option(None, "--questions",
                                                  help="JSONL of {\"question\", optional \"context\"|\"schema\"}."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Questions generated together."),
    max_new_tokens: int = typer.Option(MAX_NEW_TOKENS, "--max-new-tokens", min=1),
    timeout_s: float = typer.Option(5.0, "--timeout-s", min=0.01, help="Time limit of one query with --run."),
    row_limit: int = typer.Option(1000, "--row-limit", min=1, help="Most rows a query may return with --run."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: GPU if any)."),
    decoding: str = typer.Option("greedy", "--decoding", help="greedy, or checked: the first of up to --candidates "
                                 "answers that parses, resolves against the schema and runs on databases built "
                                 "from it (with --db, that file's schema); when none does, the best-scored one, "
                                 "with a warning. vote: the greedy answer and --candidates samples run on "
                                 "generated databases; the largest group of equal results wins."),
    candidates: int = typer.Option(CANDIDATES, "--candidates", help="Checked decoding: the most candidates a "
                                   "question gets (the greedy answer, then a beam search's). Vote decoding: the "
                                   "samples beside the greedy answer."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say on stderr where the time went: start-up, model "
                                 "load, answering, CUDA graph capture."),
):
    """Answer a question about some tables with one SQL query (and, with --db --run, its rows). In a batch, line N
    of the output is the answer to question N: an answer's line breaks, backslashes and control characters are
    written as backslash escapes (\\n, \\\\, \\x1b); --json gives the exact text."""
    with one_line_errors("t2s ask"):
        if not model:
            raise T2SError("no model given: pass --model a run directory, a merged model folder or a Hub id")
        checked.check_decoding(decoding)
        checked.check_candidates_count(candidates)
        checked_timeout(timeout_s)
        if run and db is None:
            raise T2SError("--run executes the SQL on a database: pass --db file.sqlite")
        source = ask.resolve_model(model)  # every input is checked before the slow imports and the load
        context = default_context(schema, schema_file, db)
        pairs, batch = read_pairs(question, questions_file, context, sys.stdin)
        checked_pairs(pairs, lambda index: f"question {index + 1}: " if batch else "")
        if not sys.stderr.isatty():  # a piped stderr gets the error lines only, not transformers' loading bar
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        started_s = process_age_s()  # Python, t2s's imports, the inputs read and checked
        generator = ask.load(source, device, max_new_tokens, decoding=decoding, candidates=candidates)
        ok = answer_all(generator, pairs, batch, batch_size=batch_size, db=db, execute=run, as_json=as_json,
                        timeout_s=timeout_s, row_limit=row_limit, verbose=verbose, started_s=started_s)
    if not ok:
        raise typer.Exit(2)
