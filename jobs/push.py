"""push: the merged model (or the adapter), a generated model card, the eval report and the logs, to a
Hugging Face Hub model repo (private unless push.private=false).

    repo path                     ← run directory
    README.md                     ← the model card, rendered into runs/<id>/push/ (never into merged/ or adapter/)
    *.safetensors, config.json,   ← merged/ (push.artifact=merged, the default) or adapter/ (push.artifact=adapter);
    tokenizer*, chat template,       their own README.md, if any, gives way to the card
    generation_config.json
    eval/...                      ← eval/, only when eval finished (otherwise the card says "not evaluated")
    logs/...                      ← logs/, except push.log: this job's own log, still being written
    run/...                       ← config.resolved.yaml, data/manifest.json and the jobs' .done markers

Needs a finished merge (merged) or train (adapter). Eval is optional: a model may be shared before, or
without, a long evaluation, and the card then says so instead of showing numbers.
The token comes only from HF_TOKEN and goes only into huggingface_hub's request headers: it is never
printed, logged or written, and every Hub failure becomes a one-line message of our own (the library's
messages carry URLs and server text). Local files are only read, so a failed push loses nothing.
The repo's files are compared with the local ones (size, then git blob sha1 or LFS sha256) before anything
is sent: a rerun with unchanged content uploads nothing and makes no commit. (`t2s push` after a finished
push is skipped by the CLI, as every finished job is; `--force` pushes again, and then only what changed.)
Network failures and 5xx answers are retried push.retries times with exponential backoff (base
T2S_PUSH_BACKOFF_S, default 2 s); T2S_PUSH_TIMEOUT_S (default 300 s) bounds a stalled request.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from jobs.config import Config, secret
from jobs.errors import T2SError
from jobs.rundir import RunDir, write_atomic

RUN_FILES = ("config.resolved.yaml", "data/manifest.json", "prep.done", "train.done", "merge.done", "eval.done")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)
EXAMPLE = {"context": "CREATE TABLE head (age INTEGER)",
           "question": "How many heads of the departments are older than 56 ?"}
_SENTINEL = "T2S_ANSWER_SENTINEL"

T = TypeVar("T")


@dataclass(frozen=True)
class FileToUpload:
    path_in_repo: str
    local_path: Path
    size: int


# ---------------------------------------------------------------- what goes up


def artifact_folder(cfg: Config, run: RunDir) -> Path:
    """The folder to push, once the job that writes it has finished."""
    if cfg.push.artifact == "merged":
        run.require("merge", "push")
        folder, job = run.merged, "merge"
    else:
        run.require("train", "push")
        folder, job = run.adapter, "train"
        if not (folder / "adapter_config.json").is_file():
            raise T2SError(f"push.artifact=adapter, but {folder} has no adapter_config.json (a full fine-tune saves "
                           "the whole model there): set push.artifact=merged")
    if not any(folder.glob("*.safetensors")):
        raise T2SError(f"{folder} has no *.safetensors weights: rerun `t2s {job} --force`")
    return folder


def files_to_upload(run: RunDir, folder: Path, card: Path, evaluated: bool) -> list[FileToUpload]:
    files = [FileToUpload("README.md", card, card.stat().st_size)]
    files += _folder_files(folder, "", skip=("README.md",))
    if evaluated:
        files += _folder_files(run.eval, "eval/")
    files += _folder_files(run.logs, "logs/", skip=("push.log",))
    for name in RUN_FILES:
        path = run.root / name
        if path.is_file():
            files.append(FileToUpload(f"run/{name}", path, path.stat().st_size))
    return files


def _folder_files(folder: Path, prefix: str, skip: tuple[str, ...] = ()) -> list[FileToUpload]:
    if not folder.is_dir():
        return []
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)  # .cache/, .gitattributes, editor files
        if path.is_file() and not hidden and relative.as_posix() not in skip and path.suffix != ".tmp":
            files.append(FileToUpload(prefix + relative.as_posix(), path, path.stat().st_size))
    return files


def describe_files(files: list[FileToUpload]) -> str:
    width = max(len(f.path_in_repo) for f in files)
    lines = [f"  {human_size(f.size):>9}  {f.path_in_repo:<{width}}  ← {f.local_path}" for f in files]
    lines.append(f"  {human_size(sum(f.size for f in files)):>9}  {len(files)} files")
    return "\n".join(lines)


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the model card


def read_chat_template(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The artifact's chat template (chat_template.jinja or tokenizer_config.json) and its special tokens."""
    config = _read_json(folder / "tokenizer_config.json") or {}
    tokens = {**(_read_json(folder / "special_tokens_map.json") or {}), **config}
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tokens.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    return (template if isinstance(template, str) and template else None), special


def trained_prompt_suffix(chat_template: str, special_tokens: dict[str, str]) -> str | None:
    """What must follow the `add_generation_prompt=True` prompt to give the text that preceded the SQL in
    training (jobs.chat.render_prompt): "" for TinyLlama's template as transformers renders it, "\\n" for one
    whose generation prompt stops at "<|assistant|>"; None when the template cannot be rendered here or its
    generation prompt is no prefix of the training text. Rendered as transformers does (sandboxed jinja,
    trim_blocks, lstrip_blocks), so that pushing needs no tokenizer library."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals.update(raise_exception=raise_exception, strftime_now=time.strftime)
        template = env.from_string(chat_template)
        messages = [{"role": "system", "content": EXAMPLE["context"]}, {"role": "user", "content": EXAMPLE["question"]}]
        generation = template.render(messages=messages, add_generation_prompt=True, **special_tokens)
        training = template.render(messages=messages + [{"role": "assistant", "content": _SENTINEL}],
                                   add_generation_prompt=False, **special_tokens)
    except Exception:  # an unusual template is no reason to fail a push: the card then shows the safe recipe
        return None
    prefix, found, _ = training.partition(_SENTINEL)
    if not found or not prefix.startswith(generation):
        return None
    return prefix[len(generation):]


def render_model_card(cfg: Config, repo_id: str, *, report: dict | None, train_done: dict | None,
                      prompt_suffix: str | None) -> str:
    """README.md for the Hub: metadata, what the model does, usage, eval, training, hardware, time and cost.
    Every number comes from the run (eval/report.json, train.done, the config); what is missing says so."""
    from huggingface_hub import ModelCardData

    base = cfg.model.name_or_path
    dataset = (report or {}).get("dataset", {}).get("source") or cfg.data.source
    adapter = cfg.push.artifact == "adapter"
    tags = ["text-to-sql", "sql", "t2s"] + (["peft"] if adapter else []) + (
        [cfg.train.method] if cfg.train.method in ("lora", "qlora") else [])
    metadata = ModelCardData(
        base_model=base if _is_hub_id(base) else None,
        datasets=[dataset] if _is_hub_id(dataset) else None,
        license=cfg.push.license,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    base_md = f"[{base}](https://huggingface.co/{base})" if _is_hub_id(base) else f"`{base}`"
    dataset_md = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if _is_hub_id(dataset) else f"`{dataset}`"
    what = ("a LoRA adapter for " + base_md + " (load it on top of the base model with peft)" if adapter
            else "a fine-tune of " + base_md + (" (the LoRA adapter merged into the base weights; plain transformers "
                                                 "loads it)" if cfg.train.method != "full" else ""))
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"Text-to-SQL: given the `CREATE TABLE` statements of a database and a question, the model answers with one "
        f"SQL query and nothing else. This repo holds {what}, trained by t2s on {dataset_md}.",
        _usage_section(repo_id, adapter, prompt_suffix, cfg.eval.max_new_tokens),
        _eval_section(report, cfg.push.artifact, base),
        _training_section(cfg, train_done, dataset_md),
        _cost_section(cfg, train_done),
        _files_section(adapter, report is not None),
    ]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def _usage_section(repo_id: str, adapter: bool, suffix: str | None, max_new_tokens: int) -> str:
    if adapter:
        load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f'repo = "{repo_id}"\ntokenizer = AutoTokenizer.from_pretrained(repo)\n'
                'model = AutoPeftModelForCausalLM.from_pretrained(repo, torch_dtype="auto")')
    else:
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'repo = "{repo_id}"\ntokenizer = AutoTokenizer.from_pretrained(repo)\n'
                'model = AutoModelForCausalLM.from_pretrained(repo, torch_dtype="auto")')
    messages = (f"schema = {json.dumps(EXAMPLE['context'])}\nquestion = {json.dumps(EXAMPLE['question'])}\n"
                'messages = [{"role": "system", "content": schema}, {"role": "user", "content": question}]')
    if suffix is None:
        prompt = (
            "# The prompt must be exactly the text that preceded the SQL in training: render the whole\n"
            "# conversation and cut it where the answer starts.\n"
            'answer = {"role": "assistant", "content": "@@SQL@@"}\n'
            "text = tokenizer.apply_chat_template(messages + [answer], tokenize=False)\n"
            'prompt = text[: text.index("@@SQL@@")]')
        note = ("The prompt is cut from the rendered training text rather than built with "
                "`add_generation_prompt=True`, which t2s could not check for this chat template.")
    else:
        prompt = "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)"
        if suffix:
            prompt += f"\nprompt += {json.dumps(suffix)}  # the training text had this before the SQL"
            note = (f"The trained prompt prefix: training put the SQL right after the rendered assistant header, which "
                    f"is the `add_generation_prompt=True` prompt followed by `{json.dumps(suffix)}`. Leaving it out "
                    "silently costs accuracy.")
        else:
            note = ("The trained prompt prefix: `add_generation_prompt=True` renders exactly the text that preceded "
                    "the SQL in training.")
    generate = ('inputs = tokenizer(prompt, return_tensors="pt").to(model.device)\n'
                f"output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)  # greedy\n"
                'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())')
    return ("## Usage\n\nThe system message is the schema (`CREATE TABLE ...`), the user message the question; "
            f"decoding is greedy.\n\n```python\n{load}\n\n{messages}\n{prompt}\n{generate}\n```\n\n{note}")


def _eval_section(report: dict | None, artifact: str, base: str) -> str:
    if report is None:
        return ("## Evaluation\n\nNot evaluated: this run had no finished eval (`t2s eval`) when it was pushed, so "
                "no accuracy is claimed here.")
    results = report.get("results") or {}
    split = report.get("split", "not recorded")
    lines = ["## Evaluation", ""]
    dataset = report.get("dataset") or {}
    lines.append(f"On the held-out **{split}** split ({_count(report.get('n_examples'))} examples) of "
                 f"`{dataset.get('source', 'not recorded')}` as this run prepared it (content hash "
                 f"`{dataset.get('hash', 'not recorded')}`):")
    lines += ["", "| model | SQL-only | exact match | execution accuracy | examples | gold SQL errors |",
              "|---|---|---|---|---|---|"]
    for label, scores in results.items():
        name = _model_label(label, base) + (" — **this repo**" if label == artifact else "")
        lines.append(f"| {name} | {_percent(scores.get('sql_only'))} | {_percent(scores.get('exact_match'))} | "
                     f"{_percent(scores.get('execution_accuracy'))} | {_count(scores.get('n'))} | "
                     f"{_count(scores.get('gold_error'))} |")
    if not results:
        lines.append("| (no results in the report) | not measured | not measured | not measured | | |")
    lines += ["", "Greedy answers. SQL-only: one SQL query and nothing else (checked with a SQL parser). Exact match: "
              "the reference query, up to whitespace, keyword case, quoting and a trailing semicolon. Execution "
              "accuracy: the same rows as the reference query on generated SQLite databases, over the examples whose "
              "reference query runs (the others are the gold SQL errors). Per-bucket scores and every prediction: "
              "`eval/report.md`, `eval/report.json`, `eval/predictions.jsonl`."]
    lines += ["", "| model | queries/s | tokens/s | mean latency |", "|---|---|---|---|"]
    for label, scores in results.items():
        latency = scores.get("latency_ms_mean")
        lines.append(f"| {_model_label(label, base)} | {_number(scores.get('queries_per_s'))} | "
                     f"{_number(scores.get('tokens_per_s'))} | "
                     f"{_number(latency) + ' ms' if _is_number(latency) else 'not measured'} |")
    splits = dataset.get("splits") or {}
    lines += ["", "Dataset splits:", "", "| split | rows |", "|---|---|"]
    lines += [f"| {name} | {_count(splits.get(name))} |" for name in ("train", "validation", "test")]
    return "\n".join(lines)


def _training_section(cfg: Config, train_done: dict | None, dataset_md: str) -> str:
    t = cfg.train
    done = train_done or {}
    method = {"lora": "LoRA", "qlora": "QLoRA (4-bit base)", "full": "full fine-tune"}[t.method]
    if t.method in ("lora", "qlora"):
        targets = t.lora.target_modules if isinstance(t.lora.target_modules, str) else ", ".join(t.lora.target_modules)
        method += f": r={t.lora.r}, alpha={t.lora.alpha}, dropout={t.lora.dropout}, target modules {targets}"
    processes = done.get("num_processes", done.get("num_gpus"))
    batch = f"{t.per_device_batch_size} per device × {t.gradient_accumulation_steps} accumulation"
    if isinstance(processes, int) and processes > 0:
        per_step = t.per_device_batch_size * t.gradient_accumulation_steps * processes
        batch += f" × {processes} processes = {per_step} per step"
    rows = [
        ("method", method),
        ("base model", f"`{cfg.model.name_or_path}`"),
        ("data", dataset_md),
        ("epochs", f"{t.epochs:g}" if t.max_steps <= 0 else f"max_steps {t.max_steps}"),
        ("learning rate", f"{t.learning_rate:g}, {t.lr_scheduler} schedule, warmup ratio {t.warmup_ratio:g}"),
        ("batch", batch),
        ("packing / max sequence length", f"{t.packing} / {t.max_seq_length}"),
        ("loss", "completion only (prompt tokens masked)" if t.completion_only_loss else "whole text"),
        ("optimizer steps", _count(done.get("global_step"))),
        ("examples seen", _count(done.get("examples_seen"))),
        ("final training loss", _number(done.get("train_loss"))),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return ("## Training\n\nSettings from the run's config (`run/config.resolved.yaml`); progress from "
            f"`run/train.done`.\n\n| | |\n|---|---|\n{table}")


def _cost_section(cfg: Config, train_done: dict | None) -> str:
    done = train_done or {}
    if cfg.push.hardware:
        hardware = cfg.push.hardware
    elif done.get("gpu_name"):
        hardware = f"{done.get('num_gpus', '?')} × {done['gpu_name']}"
    elif done.get("num_gpus") == 0:
        hardware = "CPU (no GPU)"
    else:
        hardware = "unknown"
    runtime = done.get("train_runtime_s")
    rate = cfg.push.cost_per_hour_usd
    time_text = f"{_duration(runtime)} ({runtime:,.0f} s of training)" if _is_number(runtime) else "unknown"
    if _is_number(runtime) and rate is not None:
        cost = (f"≈ ${runtime / 3600 * rate:,.2f} (training time × ${rate:g}/h; setup, eval and idle time "
                "not included)")
    else:
        cost = "unknown"
    return ("## Hardware, time and cost\n\n| | |\n|---|---|\n"
            f"| hardware | {hardware} |\n| training time | {time_text} |\n| cost | {cost} |")


def _files_section(adapter: bool, evaluated: bool) -> str:
    weights = ("adapter (`adapter_model.safetensors`, `adapter_config.json`)" if adapter
               else "model (`*.safetensors`, `config.json`)")
    lines = ["## Files", "", f"- the {weights}, tokenizer, chat template and `generation_config.json`"]
    if evaluated:
        lines.append("- `eval/`: the evaluation report (`report.json`, `report.md`), predictions and plots")
    lines += ["- `logs/`: the run's job logs and training metrics",
              "- `run/`: the resolved config, the data manifest and each job's completion record"]
    return "\n".join(lines)


def _model_label(label: str, base: str) -> str:
    if label == "base":
        return f"base (`{base}`)"
    if label.startswith("base:"):
        return f"base, {label.split(':', 1)[1].replace('_', '-')} prompt"
    return {"merged": "fine-tuned (merged)", "adapter": "fine-tuned (adapter)"}.get(label, label)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(value: Any) -> str:
    """Report metrics are fractions of the examples, 0..1."""
    return f"{100 * value:.1f}%" if _is_number(value) else "not measured"


def _number(value: Any) -> str:
    return f"{value:,.4g}" if _is_number(value) else "not measured"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "not measured"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def _is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).exists()


# ---------------------------------------------------------------- the Hub (thin shell)


def ensure_model_repo(api, repo_id: str, private: bool):
    """Creates the model repo if needed; its info. A name taken by a dataset or Space is a clear error."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        api.create_repo(repo_id, repo_type="model", private=private)
    except HfHubHTTPError as err:
        # 409: the name exists, as a model repo or as another kind (checked below). 401/403: this token may not
        # create repos there, but may still be allowed to write to an existing one.
        if err.response is None or err.response.status_code not in (401, 403, 409):
            raise
        if err.response.status_code != 409:
            try:
                return api.repo_info(repo_id, repo_type="model")
            except HfHubHTTPError:
                raise err from None
    try:
        return api.repo_info(repo_id, repo_type="model")
    except RepositoryNotFoundError:
        other = next((kind for kind in ("dataset", "space") if api.repo_exists(repo_id, repo_type=kind)), None)
        if other:
            raise T2SError(f"push.repo_id {repo_id} is a {other} repo on the Hub, not a model repo: "
                           "choose another push.repo_id") from None
        raise T2SError(f"the Hub would neither create nor show the model repo {repo_id}: check push.repo_id and "
                       "that HF_TOKEN may write to it") from None


def remote_files(api, repo_id: str) -> dict[str, Any]:
    from huggingface_hub import errors
    from huggingface_hub.hf_api import RepoFile

    # huggingface_hub 0.x names the remote one EntryNotFoundError
    entry_not_found = getattr(errors, "RemoteEntryNotFoundError", errors.EntryNotFoundError)
    try:
        return {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, repo_type="model")
                if isinstance(f, RepoFile)}
    except (errors.RevisionNotFoundError, entry_not_found):  # a repo without any commit yet
        return {}


def is_unchanged(file: FileToUpload, remote) -> bool:
    """Same content as the repo's file: LFS files by sha256, regular files by git blob sha1."""
    if remote is None:
        return False
    lfs = remote.lfs is not None
    kind, expected = ("sha256", remote.lfs.sha256) if lfs else ("git", remote.blob_id)
    if (remote.lfs.size if lfs else remote.size) != file.size:
        return False
    stat = file.local_path.stat()
    return file_digest(file.local_path, kind, stat.st_size, stat.st_mtime_ns) == expected


@functools.lru_cache(maxsize=None)
def file_digest(path: Path, kind: str, size: int, mtime_ns: int) -> str:
    """sha256 of the content, or git's blob sha1 ("git"); cached per (path, size, mtime) across retries."""
    digest = hashlib.sha256() if kind == "sha256" else hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PushResult:
    commit: str | None  # the repo's head after the push
    changed: list[FileToUpload]  # empty: the repo already had every file, no commit made


def push_to_hub(api, repo_id: str, files: list[FileToUpload], *, private: bool, message: str,
                attempts: int, backoff_s: float, token: str) -> PushResult:
    """Creates the repo if needed and commits the files that differ from the repo's; one-line T2SError on failure."""
    from huggingface_hub import CommitOperationAdd

    step = "creating the repo"
    try:
        info = with_retries(lambda: ensure_model_repo(api, repo_id, private), step, attempts, backoff_s)
        if info.private is False and private:
            print(f"note: {repo_id} already exists and is public; push.private only applies when t2s creates the repo",
                  file=sys.stderr, flush=True)

        def sync() -> PushResult:
            nonlocal step
            step = "listing the repo's files"
            remote = remote_files(api, repo_id)
            step = "comparing files"
            changed = [f for f in files if not is_unchanged(f, remote.get(f.path_in_repo))]
            if not changed:  # the head now, which a commit whose answer was lost may have moved
                return PushResult(api.repo_info(repo_id, repo_type="model").sha, [])
            print(f"uploading {len(changed)} changed files ({human_size(sum(f.size for f in changed))}); "
                  f"{len(files) - len(changed)} unchanged", flush=True)
            step = "uploading and committing"
            commit = api.create_commit(
                repo_id, repo_type="model", commit_message=message,
                operations=[CommitOperationAdd(f.path_in_repo, str(f.local_path)) for f in changed])
            return PushResult(commit.oid, changed)

        # The whole comparison is retried, not the commit alone: if a commit landed but its answer was lost,
        # the retry finds nothing left to change instead of committing twice.
        return with_retries(sync, "uploading", attempts, backoff_s)
    except T2SError:
        raise
    except Exception as exc:
        raise T2SError(hub_failure(exc, repo_id=repo_id, step=step, attempts=attempts, endpoint=api.endpoint,
                                   token=token)) from None


def with_retries(action: Callable[[], T], what: str, attempts: int, backoff_s: float) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except T2SError:
            raise
        except Exception as exc:
            reason = transient_reason(exc)
            if reason is None or attempt == attempts:
                raise
            delay = min(backoff_s * 2 ** (attempt - 1), 60.0)
            print(f"push: {what} failed ({reason}); retry {attempt}/{attempts - 1} in {delay:g} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures and timeouts, from whichever HTTP client this huggingface_hub uses."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def transient_reason(exc: BaseException) -> str | None:
    """Why a failure is worth retrying (a network error, or HTTP 408/429/5xx); None when it is not."""
    from huggingface_hub.errors import HfHubHTTPError

    for cause in _causes(exc):
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            return f"HTTP {status}" if status in TRANSIENT_HTTP else None
        if isinstance(cause, _transport_errors()):
            return type(cause).__name__
    return None


def hub_failure(exc: BaseException, *, repo_id: str, step: str, attempts: int, endpoint: str, token: str) -> str:
    """Our own one-line message for a failed Hub call: never the library's text (URLs, headers), never the token."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    causes = list(_causes(exc))
    if any(isinstance(c, OfflineModeIsEnabled) for c in causes):
        return "HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, or use push.dry_run=true"
    http = next((c for c in causes if isinstance(c, HfHubHTTPError) and c.response is not None), None)
    if http is not None:
        status = http.response.status_code
        if status == 401:
            return (f"the Hub rejected HF_TOKEN (401 Unauthorized) while {step}: put a valid token with write access "
                    "in HF_TOKEN (environment or .env); tokens are made at https://huggingface.co/settings/tokens")
        if status == 403:
            return (f"HF_TOKEN may not write to {repo_id} (403 Forbidden) while {step}: use a token with write access "
                    f"to the '{repo_id.split('/')[0]}' namespace, or change push.repo_id")
        if status in TRANSIENT_HTTP:
            return (f"the Hub answered HTTP {status} while {step}, {attempts} attempt(s) in a row: try `t2s push` "
                    "again later (local files are untouched; unchanged files are not sent twice)")
        if status == 404:
            return f"{repo_id} was not found while {step} (404): check push.repo_id and that HF_TOKEN can see it"
        server = redact(http.server_message or "", token)
        return (f"the Hub refused {step} for {repo_id} (HTTP {status}{': ' + server if server else ''}): "
                "check push.repo_id and the repo's settings on the Hub")
    transport = next((c for c in causes if isinstance(c, _transport_errors())), None)
    if transport is not None:
        return (f"could not reach the Hub at {endpoint} while {step} after {attempts} attempt(s) "
                f"({type(transport).__name__}): check the network (or HF_ENDPOINT / proxy settings) and rerun "
                "`t2s push`; local files are untouched")
    detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "", token)
    return f"push to {repo_id} failed while {step}: {type(exc).__name__}{': ' + detail if detail else ''}"


def redact(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return " ".join(text.split())[:200]


def use_request_timeout(seconds: float) -> None:
    """huggingface_hub's client waits forever by default; a stalled connection must fail (and be retried)."""
    import huggingface_hub
    from huggingface_hub.utils import _http

    if hasattr(huggingface_hub, "set_client_factory"):  # huggingface_hub 1.x: httpx clients
        def client_with_timeout():
            client = _http.default_client_factory()
            client.timeout = seconds
            return client

        huggingface_hub.set_client_factory(client_with_timeout)
    else:  # huggingface_hub 0.x (the cu118 set): requests sessions, which take a timeout per request only
        def session_with_timeout():
            session = _http._default_backend_factory()
            for adapter in session.adapters.values():
                adapter.send = _with_default_timeout(adapter.send, seconds)
            return session

        huggingface_hub.configure_http_backend(session_with_timeout)


def _with_default_timeout(send: Callable, seconds: float) -> Callable:
    """A requests adapter's send that waits `seconds` where the caller gave no timeout."""
    def send_with_timeout(request, timeout=None, **kwargs):
        return send(request, timeout=timeout or seconds, **kwargs)

    return send_with_timeout


# ---------------------------------------------------------------- the job


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise T2SError(f"{path} is not valid JSON: rerun the job that writes it with --force") from None
    return data if isinstance(data, dict) else None


def read_eval_report(run: RunDir) -> dict | None:
    """The eval report, only when eval finished (a crashed eval's partial report is not shown)."""
    report_path = run.eval / "report.json"
    if not run.is_done("eval"):
        if report_path.is_file():
            print(f"note: {report_path} exists but eval did not finish (no eval.done): pushing as not evaluated",
                  file=sys.stderr, flush=True)
        return None
    report = _read_json(report_path)
    if report is None:
        raise T2SError(f"eval finished but {report_path} is missing: rerun `t2s eval --force`")
    return report


def check_repo_id(repo_id: str | None, dry_run: bool) -> str | None:
    if repo_id is None:
        if dry_run:
            return None
        raise T2SError("push.repo_id is not set: add `push: {repo_id: your-name/model-name}` to the config, "
                       "or --set push.repo_id=your-name/model-name (--set push.dry_run=true shows what would go up)")
    if not HUB_ID.match(repo_id) or len(repo_id.split("/")[1]) > 96:
        raise T2SError(f"push.repo_id {repo_id!r} is not 'owner/name' of a model repo (letters, digits, '-', '_', "
                       "'.'; no URL and no datasets/ or spaces/ prefix): fix push.repo_id")
    return repo_id


def run(cfg: Config, run: RunDir) -> str:
    push = cfg.push
    repo_id = check_repo_id(push.repo_id, push.dry_run)
    folder = artifact_folder(cfg, run)
    token = None
    if not push.dry_run:
        token = secret("HF_TOKEN")
        if not token:
            raise T2SError("HF_TOKEN is not set: put a Hub token with write access in the environment or in .env "
                           "(HF_TOKEN=...), or use --set push.dry_run=true")

    report = read_eval_report(run)
    template, special_tokens = read_chat_template(folder)
    suffix = trained_prompt_suffix(template, special_tokens) if template else None
    shown_id = repo_id or f"your-name/{cfg.run_id}"
    card = render_model_card(cfg, shown_id, report=report, train_done=_read_json(run.marker("train")),
                             prompt_suffix=suffix)
    staging = run.root / "push"  # the card as pushed, kept beside the run; merged/ and adapter/ stay as they were
    staging.mkdir(exist_ok=True)
    card_path = staging / "README.md"
    write_atomic(card_path, card)

    files = files_to_upload(run, folder, card_path, evaluated=report is not None)
    total = human_size(sum(f.size for f in files))
    visibility = "private" if push.private else "public"
    print(f"{push.artifact} model from {folder}{'' if report else ' (not evaluated)'} → {shown_id} ({visibility}):",
          flush=True)
    print(describe_files(files), flush=True)
    if push.dry_run:
        return (f"dry run: {len(files)} files ({total}) would go to {repo_id or '(push.repo_id not set)'} "
                f"({visibility}); card in {card_path}")

    from huggingface_hub import HfApi

    use_request_timeout(float(os.environ.get("T2S_PUSH_TIMEOUT_S", 300)))
    api = HfApi(token=token)  # endpoint: HF_ENDPOINT, else huggingface.co
    result = push_to_hub(api, repo_id, files, private=push.private, token=token,
                         message=f"t2s push: run {cfg.run_id} ({push.artifact})",
                         attempts=push.retries + 1, backoff_s=float(os.environ.get("T2S_PUSH_BACKOFF_S", 2.0)))
    url = f"{api.endpoint}/{repo_id}"
    run.mark_done("push", repo_id=repo_id, url=url, commit=result.commit, artifact=push.artifact,
                  evaluated=report is not None, files=len(files), changed=[f.path_in_repo for f in result.changed])
    short = (result.commit or "?")[:8]
    if not result.changed:
        return f"{url} already has these {len(files)} files (commit {short}): nothing uploaded, no new commit"
    return f"pushed {len(result.changed)} of {len(files)} files to {url} (commit {short})"


if __name__ == "__main__":
    from jobs.cli import job_main

    job_main("push")
