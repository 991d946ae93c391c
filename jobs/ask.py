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

The command (its input and output) is jobs/ask_command.py; this module is the Python API under it:
    from jobs import ask
    generator = ask.load("runs/<id>")                   # or ask.load("runs/<id>", decoding="checked", candidates=4)
    generator.sql("CREATE TABLE t (a INTEGER)", "How many rows are there?")
    generator.answers([(schema, question), ...])       # Answer objects: .text, .sql_only, .checked (checked decoding)
"""

from __future__ import annotations

import json
import math
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jobs.lib import checked, sandbox, sqlcheck
from jobs.lib.errors import T2SError, first_line, printable
from jobs.lib.hub import names_local_model
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


def checked_text(text: str, where: str) -> str:
    """`text` when it is valid Unicode: an argument that is not UTF-8 reaches Python as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise T2SError(f"{where} is not UTF-8 text: pass it as UTF-8") from None
    return text


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
        from jobs.lib import candidates  # torch: loaded with the model, not when ask is imported
        from jobs.lib.chat import render_prompt

        prompts = [render_prompt(self.tokenizer, context, question) for context, question in pairs]
        return candidates.search_with_model(self.model, self.tokenizer, prompts, greedy, self.candidates, batch_size,
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
