"""Secrets (credentials): where they come from (the environment or .env, never a config), how to spot one,
how to hide one.

Three questions, one place:
- `secret(name)`: the value of a secret, from the environment, else .env.
- `find_secret(text)`: does this text hold a secret? The value of any secret this machine knows (every variable
  with a secret's name in the environment or .env, and the Hub login token file), a token of a known shape
  (Hugging Face, RunPod, GitHub, AWS), or a long random-looking word. A config holding one is refused.
- `redact(text)`: every known secret value and every token of a known shape replaced by a placeholder; applied
  to what is printed and to every text file uploaded. The random-looking rule is left out there: logs are full
  of hashes and ids, and it is only needed to refuse a config, where a false alarm costs one line.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

# Names read as secrets by t2s or by the libraries it runs (huggingface_hub reads the first three as a token).
SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "HUGGINGFACE_TOKEN", "HUGGINGFACEHUB_API_TOKEN",
                "RUNPOD_API_KEY")
# Any other variable named like a secret (WANDB_API_KEY, GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD).
_SECRET_NAME = re.compile(r"(?:^|_)(?:TOKEN|SECRET|PASSWORD|PASSWD|APIKEY|CREDENTIALS?)(?:_|$)|"
                          r"(?:^|_)(?:API|ACCESS|SECRET|PRIVATE|AUTH)_KEY(?:_|$)")
# Values of such variables that are switches, not secrets (HF_HUB_DISABLE_IMPLICIT_TOKEN=1).
_FLAG_VALUES = {"", "0", "1", "true", "false", "yes", "no", "on", "off", "none", "null"}
_MIN_KNOWN_LENGTH = 8  # shorter values (a PIN, "test") would hide ordinary words everywhere

# Tokens whose shape alone gives them away: (what it is, pattern).
TOKEN_SHAPES = (
    ("a Hugging Face token", re.compile(r"(?<![A-Za-z0-9])(?:hf|api_org)_[A-Za-z0-9]{30,}")),
    ("a RunPod API key", re.compile(r"(?<![A-Za-z0-9])rpa_[A-Za-z0-9]{30,}")),
    ("a GitHub token", re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,})")),
    ("an AWS access key id", re.compile(r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])")),
)
# A long unbroken run of letters and digits: a random key (an old-style RunPod key, an API key, a password
# generator's output) unless it reads like hex or words (see `looks_random`). Identifiers break their words
# up with - or _, which is also the way out for one that trips this rule.
_LONG_WORD = re.compile(r"[A-Za-z0-9]{32,}")


def secret(name: str, env_file: str | Path = ".env") -> str | None:
    """A secret from the environment, else from .env; never from the config file, never logged."""
    if name in os.environ and os.environ[name]:
        return os.environ[name]
    env_path = Path(env_file)
    if env_path.is_file():
        return dotenv_values(env_path).get(name) or None
    return None


def is_secret_name(name: str) -> bool:
    return name.upper() in SECRET_NAMES or bool(_SECRET_NAME.search(name.upper()))


def known_secrets(env_file: str | Path = ".env") -> dict[str, str]:
    """{value: where it comes from} for every secret this machine holds: variables with a secret's name in the
    environment and in .env, and the Hub login token (`hf auth login` writes it to $HF_HOME/token)."""
    found: dict[str, str] = {}

    def add(name: str, value: str | None) -> None:
        value = (value or "").strip()
        if len(value) >= _MIN_KNOWN_LENGTH and value.lower() not in _FLAG_VALUES and value not in found:
            found[value] = name

    env_path = Path(env_file)
    from_file = dotenv_values(env_path) if env_path.is_file() else {}
    for source in (os.environ, from_file):
        for name, value in source.items():
            if is_secret_name(name):
                add(name, value)
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    token_file = Path(os.environ.get("HF_TOKEN_PATH") or hf_home / "token")
    try:
        add("the Hub login token", token_file.read_text(errors="replace"))
    except OSError:
        pass
    return found


def looks_random(word: str) -> bool:
    """A run of 32+ letters and digits that is neither hex (hashes, ids) nor words run together: it mixes
    letters with digits, has no English-like stretch of lowercase, and its characters hardly repeat."""
    if len(word) < 32 or re.fullmatch(r"[0-9a-f]+|[0-9A-F]+", word):
        return False
    digits = sum(c.isdigit() for c in word)
    if digits < 2 or len(word) - digits < 2 or re.search(r"[a-z]{5,}", word):
        return False
    counts = Counter(word)
    return -sum(n / len(word) * math.log2(n / len(word)) for n in counts.values()) >= 4.0


@dataclass(frozen=True)
class Found:
    what: str  # "the value of HF_TOKEN", "a Hugging Face token", "a random-looking key"


def find_secret(text: str, known: dict[str, str] | None = None) -> Found | None:
    """What secret the text holds, if any (known values first, then shapes, then random-looking words)."""
    known = known_secrets() if known is None else known
    for value, name in known.items():
        if value in text:
            return Found(f"the value of {name}")
    for what, pattern in TOKEN_SHAPES:
        if pattern.search(text):
            return Found(what)
    if any(looks_random(word) for word in _LONG_WORD.findall(text)):
        return Found("a random-looking key")
    return None


def find_secret_in_config(data, known: dict[str, str] | None = None) -> tuple[str, Found] | None:
    """(where, what) of the first secret among a raw config's keys and values, e.g. ("config key
    'push.hardware'", a Hugging Face token), or None."""
    known = known_secrets() if known is None else known

    def walk(node, key: str):
        if isinstance(node, dict):
            for name, value in node.items():
                if (found := find_secret(str(name), known)) is not None:
                    return (f"a key name under '{key}'" if key else "a top-level key name"), found
                if (hit := walk(value, f"{key}.{name}" if key else str(name))) is not None:
                    return hit
        elif isinstance(node, (list, tuple)):
            for index, value in enumerate(node):
                if (hit := walk(value, f"{key}[{index}]")) is not None:
                    return hit
        elif isinstance(node, str) and (found := find_secret(node, known)) is not None:
            return f"config key '{key}'", found
        return None

    return walk(data, "")


Redactor = Callable[[str], str]


def redactor(known: dict[str, str] | None = None) -> Redactor:
    """`redact` with the known secrets read once (reading .env for every log line would be wasteful)."""
    known = known_secrets() if known is None else known
    # Longest first, so that a secret containing another is hidden whole.
    values = sorted(known.items(), key=lambda item: -len(item[0]))

    def hide(text: str) -> str:
        for value, name in values:
            if value in text:
                text = text.replace(value, f"<{name}>" if name.isidentifier() else "<secret>")
        for _, pattern in TOKEN_SHAPES:
            text = pattern.sub("<secret>", text)
        return text

    return hide


def redact(text: str) -> str:
    """Every known secret value and every token of a known shape in text, replaced by a placeholder."""
    return redactor()(text)


# Uploads bigger than this are model weights and the like: scanned for known values, never rewritten.
MAX_TEXT_BYTES = 64 << 20


def redacted_bytes(path: Path, hide: Redactor, known: dict[str, str]) -> bytes | None:
    """The file's content with its secrets hidden, when it holds any; None when it holds none. A file that is
    not UTF-8 text (weights, images, TensorBoard events) cannot be rewritten safely: if it holds a known secret
    value, ValueError says which."""
    size = path.stat().st_size
    if size <= MAX_TEXT_BYTES:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            hidden = hide(text)
            return None if hidden == text else hidden.encode("utf-8")
    if name := _known_value_in_binary(path, known):
        raise ValueError(f"{path} holds the value of {name} and is not text, so it cannot be redacted")
    return None


def _known_value_in_binary(path: Path, known: dict[str, str]) -> str | None:
    import mmap

    if not known or path.stat().st_size == 0:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return next((name for value, name in known.items() if data.find(value.encode()) != -1), None)
