"""ask: one SQL query for a question about some tables, from a fine-tuned model.

    t2s ask --model runs/<id> --schema "CREATE TABLE t (a INTEGER)" "How many rows have a above 3?"
    t2s ask --model runs/<id> --db shop.sqlite --run "Which product sold most?"
    t2s ask --model org/name --schema-file schema.sql --json - < questions.txt

The model sees exactly the prompt it was trained on (jobs.lib.chat.render_prompt) and answers greedily, or, with
`--decoding checked`, with the first of up to --candidates answers that passes its checks (jobs.lib.checked: it parses,
its tables and columns resolve against the schema, it runs read-only on databases built from the schema; with --db,
that file's schema). An answer that is not one SQL query is refused (NotSQLError, carrying the raw text); with --run
the query is executed on the SQLite file read-only in a jobs.lib.sandbox worker (reading only, time, memory and row
limits, nothing written beside the file). What reaches the terminal cannot drive it: control characters in the
model's SQL, in database values and in error lines are printed as escapes (printable).

Python:
    from jobs import ask
    generator = ask.load("runs/<id>")                   # or ask.load("runs/<id>", decoding="checked", candidates=4)
    generator.sql("CREATE TABLE t (a INTEGER)", "How many rows are there?")
    generator.answers([(schema, question), ...])       # Answer objects: .text, .sql_only, .checked (checked decoding)
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import typer

from jobs.lib import checked, sandbox, sqlcheck
from jobs.lib.hub import names_local_model
from jobs.lib.errors import T2SError, first_line, one_line_errors, printable
from jobs.lib.rundir import RunDir
from jobs.lib.sandbox import QueryRows

MAX_NEW_TOKENS = 128
CANDIDATES = 4  # checked decoding: the greedy answer, then up to three more from a beam search of four
PREVIEW_CHARS = 120  # of a refused answer, in its one-line error
# The longest schema + question, in characters, refused before the model loads: far beyond any model's context, so a
# runaway input costs nothing. The model's own context (its max_position_embeddings) caps the prompt in tokens, for
# every decoding mode, before anything is generated (a beam search of a 160 KB question allocated gigabytes).
MAX_PROMPT_CHARS = 200_000
MAX_TIMEOUT_S = 3600.0  # --timeout-s: a query's time limit is finite, at most an hour


class NotSQLError(T2SError):
    """The model answered with something other than one SQL query; `.raw_text` is what it said."""

    def __init__(self, raw_text: str):
        self.raw_text = raw_text
        preview = json.dumps(raw_text[:PREVIEW_CHARS] + ("…" if len(raw_text) > PREVIEW_CHARS else ""),
                             ensure_ascii=False)  # one line: newlines show as \n
        super().__init__(f"the model's answer is not one SQL query ({not_sql_reason(raw_text)}): {preview}")


@dataclass(frozen=True)
class Answer:
    question: str
    text: str  # what the model said, stripped: the SQL when sql_only
    sql_only: bool
    latency_ms: float  # wall time of the generation batch it was in (checked decoding: of the whole call)
    checked: bool | None = None  # checked decoding: whether the answer passed every check; None when greedy
    why_unchecked: str = ""  # checked decoding, when no candidate passed: why, in one line
    candidates_tried: int = 0  # checked decoding: candidates checked for it


# ---------- pure core ----------

def not_sql_reason(text: str) -> str:
    statements = sqlcheck.parse_statements(text)
    if not text.strip():
        return "it is empty"
    if not statements:
        return "it is not SQL"
    if len(statements) > 1:
        return f"it holds {len(statements)} statements"
    return f"it is a {statements[0].key.upper()} statement, not a query"


def checked_sql(text: str) -> str:
    """The answer when it is exactly one SQL query; NotSQLError otherwise."""
    if sqlcheck.single_query(text.strip()) is None:
        raise NotSQLError(text)
    return text.strip()


def checked_schema(context: str, where: str) -> str:
    """The context, stripped, when it is CREATE TABLE statements; a T2SError naming `where` otherwise."""
    context = context.strip()
    if not context:
        raise T2SError(f"{where} is empty: give the CREATE TABLE statements of the tables the question is about")
    if sqlcheck.parse_schema(context) is None:
        raise T2SError(f"{where} does not parse as CREATE TABLE statements (and nothing else): "
                       "give e.g. \"CREATE TABLE songs (title VARCHAR, year INTEGER)\"")
    return context


def checked_pairs(pairs: list[tuple[str, str]], where: Callable[[int], str]) -> list[tuple[str, str]]:
    """(context, question) pairs that can be rendered into a prompt: valid Unicode (JSON's \\ud800 escapes give lone
    surrogates), and schema + question within MAX_PROMPT_CHARS; one line naming `where(index)` otherwise."""
    for index, (context, question) in enumerate(pairs):
        for text, what in ((question, "the question"), (context, "the schema")):
            if not isinstance(text, str):
                raise T2SError(f"{where(index)}{what} must be a string (got {type(text).__name__})")
            checked_text(text, f"{where(index)}{what}")
        if len(context) + len(question) > MAX_PROMPT_CHARS:
            raise T2SError(f"{where(index)}the schema and question are {len(context) + len(question):,} characters, "
                           f"more than the {MAX_PROMPT_CHARS:,} a prompt may have: shorten the question, or give only "
                           "the tables it is about")
    return pairs


def checked_timeout(timeout_s: float) -> float:
    """--timeout-s when it is a finite number of seconds up to MAX_TIMEOUT_S: inf would turn the time limit off."""
    if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        raise T2SError(f"--timeout-s must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:.0f} "
                       f"(got {timeout_s}): a query's time limit cannot be switched off")
    return timeout_s


def is_allocation_failure(error: BaseException) -> bool:
    """Out of host or GPU memory (torch.OutOfMemoryError; torch.cuda.OutOfMemoryError on torch 2.1), without
    importing torch."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


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


def json_line(record: dict) -> str:
    """One JSON object on one line that strict parsers accept and that cannot drive a terminal: numbers JSON cannot
    write (SQLite's Inf) become the strings "Infinity" / "-Infinity" / "NaN"; DEL, C1 controls and invisible format
    characters are written as \\u escapes (JSON itself escapes the other control characters)."""
    text = json.dumps(_finite(record), ensure_ascii=False, allow_nan=False, default=str)
    return "".join(_json_escape(ch) if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # as a UTF-16 surrogate pair, the only way JSON writes a character beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


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


# ---------- model ----------

@dataclass(frozen=True)
class ModelSource:
    """What ask loads: a model folder or Hub id, or a trained run's base model with its LoRA adapter."""
    model: str
    run: RunDir | None = None  # set for a run trained with LoRA but not merged: base + adapter, unmerged


def from_run(run: RunDir) -> ModelSource:
    """A run's merged model; before `t2s merge`, what training left: base + LoRA adapter, or the full model."""
    if run.is_done("merge"):
        return ModelSource(str(run.merged))
    run.require("train", "t2s ask")
    if run.trained() == "adapter":
        return ModelSource(str(run.trained_model()), run)
    return ModelSource(str(run.trained_model()))  # a full fine-tune saves the whole model there


def resolve_model(source: str) -> ModelSource:
    """What to load for --model: a run directory (or its adapter/ folder), a model folder, or a Hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        if RunDir(path).settings_file.is_file():
            return from_run(RunDir(path))
        if (path / "config.json").is_file():
            return ModelSource(str(path))
        if (path / "adapter_config.json").is_file():
            run = RunDir(path.parent)
            if path in (run.adapter, run.rl) and run.settings_file.is_file():
                return from_run(run)
            raise T2SError(f"{source} is a LoRA adapter outside a t2s run: pass the run directory it was trained "
                           "in, or a model merged from it")
        raise T2SError(f"{source} is neither a run directory nor a model folder (no config.json): pass a run "
                       "directory, its merged/ folder, or a Hub id like org/name")
    if path.exists():
        raise T2SError(f"{source} is a file: pass a run directory, a merged model folder or a Hub id like org/name")
    if names_local_model(source):  # never asked of the Hub (jobs.lib.hub)
        raise T2SError(f"model path {source} does not exist: pass a run directory, a merged model folder or a Hub "
                       "id like org/name")
    return ModelSource(source)


class SQLGenerator:
    """A loaded chat model that answers (schema, question) pairs with one SQL query each: greedily, or with checked
    decoding (jobs.lib.checked: the first of up to `candidates` answers that passes its checks)."""

    def __init__(self, model, tokenizer, max_new_tokens: int = MAX_NEW_TOKENS, decoding: str = "greedy",
                 candidates: int = CANDIDATES):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.decoding = checked.check_decoding(decoding)
        self.candidates = checked.check_candidates_count(candidates)
        self.load_s: float | None = None  # seconds `load` took (imports of torch and transformers included)
        self.answer_s: list[float] = []  # seconds of each call that ran the model

    def respond(self, pairs: list[tuple[str, str]], batch_size: int):
        """The model's raw generations (jobs.lib.generate.Generation), in order: the only step that runs the model."""
        from jobs.lib.chat import render_prompt
        from jobs.lib.generate import generate_batched

        started = time.perf_counter()
        prompts = [render_prompt(self.tokenizer, context, question) for context, question in pairs]
        generations = generate_batched(self.model, self.tokenizer, prompts, batch_size, self.max_new_tokens,
                                       progress=len(pairs) > batch_size and sys.stderr.isatty())
        self.answer_s.append(time.perf_counter() - started)
        return generations

    def search(self, pairs: list[tuple[str, str]], greedy: list, batch_size: int) -> list[list]:
        """Checked decoding's further candidates (jobs.lib.checked.Candidate) for each pair: its greedy answer, scored,
        then a beam search's answers, best-scored first. Only questions whose greedy answer failed get here."""
        from jobs.lib.chat import render_prompt

        prompts = [render_prompt(self.tokenizer, context, question) for context, question in pairs]
        return checked.search_with_model(self.model, self.tokenizer, prompts, greedy, self.candidates, batch_size,
                                         self.max_new_tokens)

    def check_prompt_lengths(self, pairs: list[tuple[str, str]]) -> None:
        """Every prompt, with max_new_tokens after it, fits the model's context (max_position_embeddings): one line
        naming the first that does not, before anything is generated, whatever the decoding."""
        from jobs.lib.chat import render_prompt

        context_tokens = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if self.tokenizer is None or not isinstance(context_tokens, int):
            return  # nothing to measure against (a stand-in model)
        for number, (context, question) in enumerate(pairs, start=1):
            tokens = len(self.tokenizer(render_prompt(self.tokenizer, context, question))["input_ids"])
            if tokens + self.max_new_tokens > context_tokens:
                where = f"question {number}: " if len(pairs) > 1 else ""
                raise T2SError(f"{where}the prompt (schema and question) is {tokens:,} tokens; with up to "
                               f"{self.max_new_tokens} new tokens that is more than the model's "
                               f"{context_tokens:,}-token context: shorten the question, give only the tables it "
                               "is about, or lower --max-new-tokens")

    def answers(self, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[Answer]:
        """Every answer, SQL or not, with its SQL-only verdict (and with checked decoding, whether it passed its
        checks): for callers that report refusals themselves. Inputs are checked before anything is generated (one
        prompt-length cap for every decoding); running out of memory is one line."""
        checked_pairs(pairs, lambda index: f"question {index + 1}: " if len(pairs) > 1 else "")
        for context, _ in pairs:
            checked_schema(context, "the schema")
        self.check_prompt_lengths(pairs)
        try:
            return self._answers(pairs, batch_size)
        except Exception as error:
            if not is_allocation_failure(error):
                raise
            raise T2SError(f"out of memory while answering {len(pairs)} question(s) ({first_line(error, 120)}): lower "
                           "--batch-size or --candidates, or shorten the questions") from None

    def _answers(self, pairs: list[tuple[str, str]], batch_size: int) -> list[Answer]:
        started = time.perf_counter()
        generations = self.respond(pairs, batch_size)
        if self.decoding == "greedy":
            return [Answer(question, g.text, sqlcheck.is_sql_only(g.text), g.latency_s * 1000)
                    for (_, question), g in zip(pairs, generations)]
        if self.decoding == "vote":  # jobs.lib.vote: greedy + `candidates` samples, the largest group of equal results
            from jobs.lib.chat import render_prompt
            from jobs.lib.vote import vote_with_model

            votes = vote_with_model(self.model, self.tokenizer, [render_prompt(self.tokenizer, c, q) for c, q in pairs],
                                    [c for c, _ in pairs], generations, sandbox.shared(), samples=self.candidates,
                                    batch_size=batch_size, max_new_tokens=self.max_new_tokens)
            latency_ms = (time.perf_counter() - started) * 1000
            return [Answer(question, v.text, sqlcheck.is_sql_only(v.text), latency_ms, v.voted,
                           "" if v.voted else "no candidate ran on the generated databases", v.candidates)
                    for (_, question), v in zip(pairs, votes)]
        choices = checked.choose_answers(
            [context for context, _ in pairs], generations,
            lambda indices: self.search([pairs[i] for i in indices], [generations[i] for i in indices], batch_size),
            sandbox.shared(), candidates=self.candidates)
        latency_ms = (time.perf_counter() - started) * 1000
        return [Answer(question, choice.text, sqlcheck.is_sql_only(choice.text), latency_ms, choice.checked,
                       choice.why_unchecked, len(choice.tried)) for (_, question), choice in zip(pairs, choices)]

    def sql_many(self, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[str]:
        """One SQL query per (schema, question); NotSQLError for the first answer that is not one."""
        return [checked_sql(answer.text) for answer in self.answers(pairs, batch_size)]

    def sql(self, schema: str, question: str) -> str:
        return self.sql_many([(schema, question)], batch_size=1)[0]


def load(model: str | ModelSource, device: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
         decoding: str = "greedy", candidates: int = CANDIDATES) -> SQLGenerator:
    """A SQLGenerator for a run directory (its merged model, or base + adapter before the merge), a model folder
    or a Hub id, on `device` (the GPU when there is one), decoding greedily or "checked" (up to `candidates`)."""
    checked.check_decoding(decoding)  # before the slow load
    checked.check_candidates_count(candidates)
    source = model if isinstance(model, ModelSource) else resolve_model(model)
    started = time.perf_counter()
    from jobs.lib.chat import check_chat_template
    from jobs.lib.config import load_config
    from jobs.lib.models import default_device, load_model, load_run_model, load_tokenizer, pick_dtype

    if source.run:  # base + adapter, loaded with the model settings the run was made with
        loaded, tokenizer = load_run_model(load_config(source.run.settings_file), source.run, "adapter")
    else:
        tokenizer = load_tokenizer(source.model)
        loaded = load_model(source.model, dtype=pick_dtype("auto"))
    check_chat_template(tokenizer, source.model)
    try:
        loaded = loaded.to(device or default_device()).eval()
    except (RuntimeError, AssertionError, ValueError) as error:  # no such device, or torch built without it
        raise T2SError(f"cannot put the model on device {device!r} ({first_line(error)}): pass --device cpu, or "
                       "leave --device out to use the GPU when there is one") from None
    generator = SQLGenerator(loaded, tokenizer, max_new_tokens, decoding, candidates)
    generator.load_s = time.perf_counter() - started
    return generator


# ---------- database ----------

def run_on_database(db: Path, sql: str, timeout_s: float, row_limit: int) -> QueryRows:
    """The query's rows on the SQLite file, run read-only in the sandbox (reading only, limits; nothing is written
    beside the file)."""
    try:
        return sandbox.shared().query_file(db, sql, timeout_s, row_limit)
    except sandbox.QueryRefused as error:
        raise T2SError(f"the sandbox refused the query ({error}): only reading {db} is allowed") from None
    except sandbox.QueryTimeout as error:
        raise T2SError(f"the query {error} on {db}: raise --timeout-s to wait longer") from None
    except sandbox.QueryFailed as error:
        hint = "; raise --row-limit to allow more" if "row limit" in str(error) else ""
        raise T2SError(f"the query failed on {db}: {error}{hint}") from None
    except OSError as error:
        raise T2SError(f"{db}: cannot be read ({error.strerror or error}); pass --db a readable SQLite file") from None


# ---------- CLI shell ----------

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


def checked_text(text: str, where: str) -> str:
    """`text` when it is valid Unicode: an argument that is not UTF-8 reaches Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise T2SError(f"{where} is not UTF-8 text: pass it as UTF-8") from None
    return text


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
                result = run_on_database(db, answer.text, timeout_s, row_limit)
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
        source = resolve_model(model)  # every input is checked before the slow imports and the load
        context = default_context(schema, schema_file, db)
        pairs, batch = read_pairs(question, questions_file, context, sys.stdin)
        checked_pairs(pairs, lambda index: f"question {index + 1}: " if batch else "")
        if not sys.stderr.isatty():  # a piped stderr gets the error lines only, not transformers' loading bar
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
        started_s = process_age_s()  # Python, t2s's imports, the inputs read and checked
        generator = load(source, device, max_new_tokens, decoding=decoding, candidates=candidates)
        ok = answer_all(generator, pairs, batch, batch_size=batch_size, db=db, execute=run, as_json=as_json,
                        timeout_s=timeout_s, row_limit=row_limit, verbose=verbose, started_s=started_s)
    if not ok:
        raise typer.Exit(2)
