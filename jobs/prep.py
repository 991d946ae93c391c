"""prep: load → validate every row → dedupe → leak-free seeded split → render with the chat template →
tokenize with completion-only labels → runs/<id>/data/ + manifest.json.

The pure core (validate_row, split_key, assign_split, split_rows) is what the tests call; `run` is the shell.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

from jobs.lib import sqlcheck
from jobs.lib.chat import check_chat_template, tokenize_examples
from jobs.lib.config import Config, names_local_path
from jobs.lib.errors import T2SError, first_line
from jobs.lib.models import TINY, check_source, load_run_tokenizer, tokenizer_path
from jobs.lib.rundir import RunDir, fresh_staging, write_atomic
from jobs.lib.synthetic import synthetic_rows

FIELDS = ("question", "context", "answer")
SPLITS = ("train", "validation", "test")
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# ---------- pure core ----------

def validate_row(row: dict) -> str | None:
    """The reason a row is unusable, or None when it is a valid text-to-SQL example."""
    for field in FIELDS:
        if field not in row or row[field] is None:
            return f"missing_{field}"
        if not isinstance(row[field], str):
            return f"non_string_{field}"
        if not row[field].strip():
            return f"empty_{field}"
    if sqlcheck.parse_schema(row["context"]) is None:
        return "context_not_create_table"
    if sqlcheck.single_query(row["answer"]) is None:
        return "answer_not_one_query"
    return None


def split_key(question: str) -> str:
    """A question's identity for leak checks: lower-cased, whitespace and punctuation ignored."""
    return re.sub(r"[\W_]+", "", question.lower())


def assign_split(question: str, seed: int, validation_fraction: float, test_fraction: float) -> str:
    """Seeded and stable: a question lands in the same split whatever else is in the dataset, and all rows
    sharing a normalised question land together (the seed's random slice leaked them across splits)."""
    digest = hashlib.sha256(f"{seed}:{split_key(question)}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + validation_fraction:
        return "validation"
    return "train"


def split_rows(rows: list[dict], given: dict[str, list[dict]] | None, cfg_data) -> tuple[dict[str, list[dict]], Counter]:
    """Dedupe (question, answer) pairs and split leak-free. `given` holds splits the source already made
    (kept as they are; test is carved from train when absent). Returns splits and dropped-row counts."""
    dropped: Counter = Counter()
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    seen_pairs: set[tuple[str, str]] = set()
    key_split: dict[str, str] = {}

    def place(row: dict, split: str) -> None:
        pair = (split_key(row["question"]), " ".join(row["answer"].split()))
        if pair in seen_pairs:
            dropped["duplicate_pair"] += 1
            return
        key = split_key(row["question"])
        if key_split.setdefault(key, split) != split:
            dropped["question_in_other_split"] += 1
            return
        seen_pairs.add(pair)
        splits[split].append(row)

    # Rows of held-out splits claim their questions first, so train loses the overlap, never evaluation.
    for split in ("test", "validation"):
        for row in (given or {}).get(split, []):
            place(row, split)
    for row in rows:
        split = assign_split(row["question"], cfg_data.seed, cfg_data.validation_fraction, cfg_data.test_fraction)
        if given and split == "validation" and given.get("validation"):
            split = "train"  # the source's own validation split stands; only test is carved here
        if given and split == "test" and given.get("test"):
            split = "train"
        place(row, split)
    return splits, dropped


def row_source(context: str, dataset: str) -> str:
    """sql-create-context mixes WikiSQL (tables named table_<id>) and Spider (named tables): a report bucket."""
    if dataset == "synthetic":
        return "synthetic"
    tables = sqlcheck.parse_schema(context) or []
    return "wikisql" if tables and all(t.name.lower().startswith("table_") for t in tables) else "spider"


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


# ---------- I/O shell ----------

def check(cfg: Config, run: RunDir) -> None:
    """What can be known wrong before any row is read."""
    source = cfg.data.source
    if source != "synthetic" and not Path(source).expanduser().exists() and (
            names_local_path(source) or Path(source).suffix in LOCAL_SUFFIXES):
        raise T2SError(f"dataset path {source} does not exist: set data.source to a json/jsonl/parquet file or "
                       "folder, a Hub dataset id, or 'synthetic'")
    if cfg.model.name_or_path != TINY or cfg.model.tokenizer:
        check_source(tokenizer_path(cfg, run), "tokenizer")


def load_rows(cfg: Config) -> tuple[list[dict], dict[str, list[dict]] | None]:
    """(rows to split, splits the source already made or None)."""
    source = cfg.data.source
    if source == "synthetic":
        return synthetic_rows(cfg.data.synthetic_rows, cfg.data.seed), None
    path = Path(source).expanduser()
    if path.exists():
        return _load_local(path, cfg)
    return _load_hub(source, cfg), None


def _read_file(path: Path, limit: int | None) -> list[dict]:
    from datasets import load_dataset

    kind = LOCAL_SUFFIXES.get(path.suffix)
    if kind is None:
        raise T2SError(f"dataset file {path} is not .json, .jsonl or .parquet")
    if path.stat().st_size == 0:
        raise T2SError(f"dataset file {path} is empty: it needs rows with question, context and answer")
    try:
        data = load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:
        # datasets wraps the parser's error ("JSON parse error ... in row 1") in a generic one: show the parser's
        raise T2SError(f"could not read dataset file {path}: {first_line(exc.__cause__ or exc)}") from None
    _check_columns(data.column_names, str(path))
    if limit:
        data = data.select(range(min(limit, len(data))))
    return data.to_list()


def _load_local(path: Path, cfg: Config) -> tuple[list[dict], dict[str, list[dict]] | None]:
    limit = cfg.data.max_rows
    if path.is_file():
        return _read_file(path, limit), None
    files = {f.stem: f for f in sorted(path.iterdir()) if f.suffix in LOCAL_SUFFIXES}
    if not files:
        raise T2SError(f"dataset folder {path} has no .json, .jsonl or .parquet files")
    train = [files[name] for name in files if name.startswith("train")] or list(files.values())
    rows = [row for f in train for row in _read_file(f, limit)]
    given = None
    if cfg.data.use_source_splits:
        given = {split: _read_file(files[split], limit) for split in ("validation", "test") if split in files}
    return rows, given or None


def _load_hub(name: str, cfg: Config) -> list[dict]:
    from datasets import load_dataset

    try:
        data = load_dataset(name, split="train")
    except Exception as exc:
        raise T2SError(f"could not load dataset '{name}' from the Hub ({first_line(exc, 160)}): "
                       "check the id and network, or set data.source to a local file or folder") from None
    _check_columns(data.column_names, name)
    if cfg.data.max_rows:
        data = data.select(range(min(cfg.data.max_rows, len(data))))
    return data.to_list()


def _check_columns(columns: list[str], where: str) -> None:
    missing = [f for f in FIELDS if f not in columns]
    if missing:
        raise T2SError(f"dataset {where} lacks column(s) {', '.join(missing)} (has: {', '.join(columns)}): "
                       "rows need question, context and answer")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def keep_valid(batch: list[dict], rejects: list[dict], reasons: Counter) -> list[dict]:
    """The rows of `batch` that pass validate_row, with FIELDS only; each other row goes to `rejects` with its reason."""
    from tqdm.auto import tqdm

    kept = []
    for row in tqdm(batch, desc="validating", leave=False, mininterval=2):
        reason = validate_row(row)
        if reason:
            reasons[reason] += 1
            rejects.append({"reason": reason, "row": row})
        else:
            kept.append({f: row[f] for f in FIELDS})
    return kept


def stage_tiny_base(cfg: Config, run: RunDir, train_rows: list[dict]) -> Path:
    """The tiny base model (jobs.lib.tiny), built afresh beside the old one and put in place with the data it was
    built from: a kill while it is written leaves no half a model in base/ for the next prep to trust."""
    from jobs.lib.tiny import save_tiny_base

    base = fresh_staging(run.base)
    texts = [r["context"] + "\n" + r["question"] + "\n" + r["answer"] for r in train_rows]
    save_tiny_base(base, texts, seed=cfg.train.seed)
    print(f"built the tiny base model (into {run.base})")
    return base


def write_splits(cfg: Config, tokenizer, splits: dict[str, list[dict]], staging: Path,
                 dropped: Counter) -> dict[str, list[int]]:
    """Each split's rows (jsonl) and tokenized examples into `staging`, less the rows the template cuts or that are
    over data.max_length (counted in `dropped`); `splits` keeps the rows written. Returns the token lengths."""
    from datasets import Dataset

    lengths: dict[str, list[int]] = {}
    for split in SPLITS:
        examples = tokenize_examples(tokenizer, splits[split]) if splits[split] else []
        kept_rows, columns = [], {"input_ids": [], "labels": []}
        for row, example in zip(splits[split], examples):
            if example is None:
                dropped["template_boundary"] += 1
            elif len(example.input_ids) > cfg.data.max_length:
                dropped["too_long"] += 1
            else:
                kept_rows.append({**row, "source": row_source(row["context"], cfg.data.source)})
                columns["input_ids"].append(example.input_ids)
                columns["labels"].append(example.labels)
        splits[split] = kept_rows
        lengths[split] = [len(ids) for ids in columns["input_ids"]]
        _write_jsonl(staging / f"{split}.jsonl", kept_rows)
        Dataset.from_dict(columns).save_to_disk(str(staging / "tokenized" / split))
    return lengths


def run(cfg: Config, run: RunDir) -> str:
    rows, given = load_rows(cfg)
    total = len(rows) + sum(len(v) for v in (given or {}).values())
    if total == 0:
        raise T2SError(f"dataset {cfg.data.source} is empty: it needs rows with question, context and answer")
    print(f"loaded {total} rows from {cfg.data.source}")

    rejects: list[dict] = []
    reasons: Counter = Counter()
    rows = keep_valid(rows, rejects, reasons)
    given = {split: keep_valid(batch, rejects, reasons) for split, batch in given.items()} if given else None
    staging = fresh_staging(run.data)
    _write_jsonl(staging / "rejects.jsonl", rejects)
    if total and len(rejects) / total > cfg.data.max_reject_fraction:
        worst = ", ".join(f"{r}={n}" for r, n in reasons.most_common(3))
        raise T2SError(f"{len(rejects)} of {total} rows rejected ({worst}), over data.max_reject_fraction="
                       f"{cfg.data.max_reject_fraction}: see {staging / 'rejects.jsonl'}")

    splits, dropped = split_rows(rows, given, cfg.data)

    staged = [(staging, run.data)]
    base = stage_tiny_base(cfg, run, splits["train"]) if cfg.model.name_or_path == TINY else None
    if base is not None:
        staged.append((base, run.base))
    tok_name = tokenizer_path(cfg, run)
    tokenizer = load_run_tokenizer(cfg, run, folder=str(base) if base else None)
    check_chat_template(tokenizer, tok_name)
    lengths = write_splits(cfg, tokenizer, splits, staging, dropped)
    if not splits["train"]:
        raise T2SError("no training rows left after validation, dedupe and length limits: check data.source "
                       "and data.max_length")

    all_lengths = [n for split in SPLITS for n in lengths[split]]
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update((staging / f"{split}.jsonl").read_bytes())
    manifest = {
        "source": cfg.data.source,
        "tokenizer": tok_name,
        "rows_loaded": total,
        "rows": {split: len(splits[split]) for split in SPLITS},
        "rejected": dict(reasons),
        "dropped": dict(dropped),
        "tokens": {"p50": percentile(all_lengths, 0.5), "p95": percentile(all_lengths, 0.95),
                   "max": max(all_lengths, default=0), "train_total": sum(lengths["train"])},
        "content_hash": digest.hexdigest(),
    }
    write_atomic(staging / run.manifest.name, json.dumps(manifest, indent=2) + "\n")
    run.finish("prep", cfg, staged, rows=manifest["rows"], content_hash=manifest["content_hash"])
    counts = " / ".join(f"{manifest['rows'][s]} {s}" for s in SPLITS)
    return (f"{counts} rows; {len(rejects)} rejected, {sum(dropped.values())} dropped{describe_dropped(dropped)}; "
            f"manifest {run.manifest}")


DROPPED_WHY = {"duplicate_pair": "duplicate (question, answer) pairs",
               "question_in_other_split": "questions already in another split",
               "template_boundary": "the chat template cut the answer",
               "too_long": "longer than data.max_length"}


def describe_dropped(dropped: Counter) -> str:
    """" (5 duplicate (question, answer) pairs, 2 longer than data.max_length)": why rows were dropped."""
    reasons = [f"{count} {DROPPED_WHY.get(reason, reason)}" for reason, count in dropped.most_common() if count]
    return f" ({', '.join(reasons)})" if reasons else ""
