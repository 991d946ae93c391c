"""`t2s serve`'s pure core: what a request may hold, and the JSON an answer goes back as.

Requests are checked here before anything reaches the model: a body that is not one JSON object, a field of the
wrong type, text over its length limit or holding control characters, a max_tokens over the server's cap, n > 1 —
each is an ApiError: an HTTP status and one line saying what is wrong, sent as OpenAI's error object. Responses are
OpenAI's chat.completion (and its streamed chunks) and t2s's own /v1/sql object. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from jobs.lib import sqlcheck
from jobs.ask import checked_schema, json_line
from jobs.lib.errors import T2SError

MAX_STOP_SEQUENCES = 4  # as OpenAI's API
MAX_STOP_CHARS = 64


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, whatever the client sends."""
    max_body_bytes: int = 256 * 1024
    max_question_chars: int = 2_000
    max_schema_chars: int = 20_000
    max_tokens: int = 128  # the cap on max_tokens, and the default
    max_prompt_tokens: int = 2_048  # schema + question, rendered in the model's template
    row_limit: int = 1_000  # rows /v1/sql returns with run: true (more are cut: truncated)
    query_timeout_s: float = 5.0  # a query's time limit in the sandbox


class ApiError(Exception):
    """A request the server will not answer: an HTTP status and one line for the client."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(error: ApiError) -> dict:
    """OpenAI's error object, which its clients raise as the matching exception (BadRequestError, ...)."""
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}}


def dumps(body: Any) -> bytes:
    """One JSON line that strict parsers accept (SQLite's Inf as "Infinity") and that cannot drive a terminal."""
    return json_line(body).encode("utf-8")


# ---------- request bodies ----------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: Union[StrictStr, list[TextPart], None] = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[StrictBool] = None


class ChatRequest(BaseModel):
    """OpenAI's chat completion request, as far as a SQL model honours it. Sampling settings (temperature, top_p,
    seed, ...) are accepted and ignored: answers are greedy."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[StrictStr] = None
    messages: list[Message] = Field(min_length=1, max_length=8)
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: Optional[StrictInt] = None
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None


class SqlRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    question: StrictStr
    schema_: Optional[StrictStr] = Field(None, alias="schema")
    run: StrictBool = False
    max_tokens: Optional[StrictInt] = None


def parse_body(body: bytes, model: type[BaseModel], limits: Limits) -> Any:
    """The request body as `model`; ApiError 413 / 400 with one line otherwise."""
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"the request body is over {limits.max_body_bytes} bytes")
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text") from None
    except (json.JSONDecodeError, RecursionError) as error:
        where = f" ({error.msg} at character {error.pos})" if isinstance(error, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not JSON{where}: send one JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ApiError(400, validation_message(error), param=_location(error.errors()[0])) from None


def _location(problem: dict) -> str:
    return ".".join(str(part) for part in problem.get("loc", ()) if not str(part).startswith("function-")) or "body"


def validation_message(error: ValidationError) -> str:
    """The first problem pydantic found, in one line: `messages.0.content: Input should be a valid string`."""
    problem = error.errors()[0]
    message = problem.get("msg", "is not valid")
    if problem.get("type") == "extra_forbidden":
        message = "is not a field of this request"
    more = f" (and {error.error_count() - 1} more problem(s))" if error.error_count() > 1 else ""
    return f"{_location(problem)}: {message}{more}"


def checked_text(text: str, what: str, limit: int) -> str:
    """`text` stripped, when it is non-empty, within `limit` characters, valid Unicode, and free of control and
    invisible format characters (line breaks and tabs aside); ApiError 400 otherwise."""
    if len(text) > limit:
        raise ApiError(400, f"{what} is {len(text)} characters long; at most {limit} are allowed", param=what)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{what} is not valid Unicode (a lone surrogate)", param=what) from None
    bad = next((ch for ch in text if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")
                and ch not in "\n\t\r"), None)
    if bad is not None:
        raise ApiError(400, f"{what} holds the control character U+{ord(bad):04X}: send plain text", param=what)
    if not text.strip():
        raise ApiError(400, f"{what} is empty", param=what)
    return text.strip()


def schema_of(text: str | None, default_schema: str | None, limits: Limits, what: str = "schema") -> str:
    """The CREATE TABLE statements the question is about: the request's, else the --db file's."""
    if text is None:
        if default_schema is None:
            raise ApiError(400, f"no {what} given and the server has no --db to take one from: send the CREATE "
                                "TABLE statements", param=what)
        return default_schema
    text = checked_text(text, what, limits.max_schema_chars)
    problem = _schema_problem(text)
    if problem:
        raise ApiError(400, problem.replace("the schema", f"the {what}", 1), param=what)
    return text


@functools.lru_cache(maxsize=256)  # clients send the same few schemas again and again: parse each once
def _schema_problem(text: str) -> str | None:
    try:
        checked_schema(text, "the schema")
    except T2SError as error:
        return str(error)
    return None


def max_tokens_of(value: int | None, limits: Limits, param: str = "max_tokens") -> int:
    if value is None:
        return limits.max_tokens
    if not 1 <= value <= limits.max_tokens:
        raise ApiError(400, f"{param} must be between 1 and {limits.max_tokens} (this server's cap); got {value}",
                       param=param)
    return value


def _content(message: Message, index: int) -> str:
    if message.content is None:
        raise ApiError(400, f"messages.{index}.content is missing", param=f"messages.{index}.content")
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


@dataclass(frozen=True)
class Question:
    """One question for the model: what it reads and how its answer is cut."""
    schema: str
    question: str
    max_tokens: int
    stop: tuple[str, ...] = ()


def chat_question(request: ChatRequest, default_schema: str | None, limits: Limits) -> Question:
    """The (schema, question) a chat completion asks: system = the schema (optional with --db), user = the question,
    exactly the prompt the model was trained on. Other turns, n > 1 and unknown roles are refused."""
    roles = [message.role for message in request.messages]
    if roles not in (["system", "user"], ["user"]):
        raise ApiError(400, "send one system message (the CREATE TABLE statements; optional when the server has "
                            f"--db) and then one user message (the question); got roles {roles}", param="messages")
    if request.n not in (None, 1):
        raise ApiError(400, "n must be 1: answers are greedy, so more choices would be copies of the first",
                       param="n")
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    max_tokens = max_tokens_of(request.max_tokens if request.max_tokens is not None
                               else request.max_completion_tokens, limits)
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop takes up to {MAX_STOP_SEQUENCES} non-empty sequences of at most {MAX_STOP_CHARS} "
                            "characters", param="stop")
    system = _content(request.messages[0], 0) if roles[0] == "system" else None
    question = checked_text(_content(request.messages[-1], len(roles) - 1), "the question (user message)",
                            limits.max_question_chars)
    schema = schema_of(system, default_schema, limits, "schema (system message)")
    return Question(schema, question, max_tokens, tuple(stops))


def sql_question(request: SqlRequest, default_schema: str | None, has_db: bool, limits: Limits) -> Question:
    if request.run and not has_db:
        raise ApiError(400, "run: true executes the SQL on the server's database, and this server was started "
                            "without --db", param="run")
    question = checked_text(request.question, "question", limits.max_question_chars)
    return Question(schema_of(request.schema_, default_schema, limits), question,
                    max_tokens_of(request.max_tokens, limits))


# ---------- answers ----------

@dataclass(frozen=True)
class Answered:
    """What the model answered one question with (the engine fills it in)."""
    text: str
    ended: str  # "eos": the model ended it; "limit": cut at max_tokens; "repeats": stopped looping (checked)
    prompt_tokens: int
    completion_tokens: int
    checked: Optional[bool] = None  # checked decoding: passed every check; None when greedy
    why_unchecked: str = ""
    queue_s: float = 0.0  # waiting for a batch
    generate_s: float = 0.0  # the batch's generation (and checks)
    batch_size: int = 1


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text up to the first stop sequence (which is not included, as OpenAI does), and whether one was found."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def finish_reason(answer: Answered, stopped: bool) -> str:
    return "stop" if stopped or answer.ended == "eos" else "length"


def chat_completion(completion_id: str, model: str, created: int, answer: Answered, stops: tuple[str, ...]) -> dict:
    """OpenAI's chat.completion object for one answer."""
    text, stopped = cut_at_stop(answer.text, stops)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason(answer, stopped), "logprobs": None}],
        "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                  "total_tokens": answer.prompt_tokens + answer.completion_tokens},
    }


def chat_chunks(completion_id: str, model: str, created: int, answer: Answered, stops: tuple[str, ...],
                include_usage: bool = False) -> list[dict]:
    """The same answer as OpenAI's streamed chat.completion.chunk objects: the role, the content, the finish (and
    with stream_options.include_usage, a last chunk with no choices and the usage)."""
    text, stopped = cut_at_stop(answer.text, stops)
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict, finish: str | None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    chunks = [chunk({"role": "assistant", "content": ""}, None), chunk({"content": text}, None),
              chunk({}, finish_reason(answer, stopped))]
    if include_usage:
        chunks.append({**head, "choices": [], "usage": {
            "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}})
    return chunks


def sse(chunks: list[dict]) -> bytes:
    """Server-sent events as OpenAI streams them: one `data:` line per chunk, then `data: [DONE]`."""
    return b"".join(b"data: " + dumps(chunk) + b"\n\n" for chunk in chunks) + b"data: [DONE]\n\n"


def sql_response(answer: Answered, columns: list | None = None, rows: list | None = None,
                 truncated: bool = False, run_error: str | None = None, run_s: float | None = None) -> dict:
    """/v1/sql's answer: the SQL, whether it checked out, and with run: true its rows (at most the row limit)."""
    sql_only = sqlcheck.is_sql_only(answer.text)
    body = {"sql": answer.text, "sql_only": sql_only, "checked": answer.checked,
            "why_unchecked": answer.why_unchecked or None, "finish_reason": finish_reason(answer, False),
            "columns": columns, "rows": rows, "truncated": truncated, "error": run_error,
            "timings": {"queue_ms": _ms(answer.queue_s), "generate_ms": _ms(answer.generate_s),
                        "run_ms": _ms(run_s) if run_s is not None else None, "batch_size": answer.batch_size}}
    return body


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1) if math.isfinite(seconds) else 0.0


# ---------- access ----------

def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def authorized(header: str | None, api_key: str | None) -> bool:
    """Whether the Authorization header carries the API key (Bearer), compared in constant time; True when the
    server has no key."""
    if not api_key:
        return True
    scheme, _, given = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())
