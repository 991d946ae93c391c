"""push: the merged model (or the adapter), a model card (jobs.card), the eval report and the logs, to a
Hugging Face Hub model repo (private unless push.private=false).

    repo path                     ← run directory
    README.md                     ← the model card, rendered into runs/<id>/push/ (never into merged/ or adapter/)
    *.safetensors, config.json,   ← merged/ (push.artifact=merged, the default) or adapter/ (push.artifact=adapter);
    tokenizer*, chat template,       their own README.md, if any, gives way to the card
    generation_config.json
    eval/...                      ← eval/, only when eval finished (otherwise the card says "not evaluated")
    logs/...                      ← logs/, except push.log: this job's own log, still being written
    run/...                       ← config.resolved.yaml, data/manifest.json and the jobs' .done markers

Needs a finished merge (merged) or train (adapter), and a finished eval whose scores for the fine-tuned model pass
push.gates (SQL-only, execution accuracy, not worse than the base): a broken model is never published. A model
below the gates, or not evaluated, goes up only with push.enforce_gates=false (the card then says "not evaluated"
where there is no report). Dry runs check the gates too: they show what a real push would do.
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
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from jobs.card import HUB_ID, read_chat_template, render_model_card, trained_prompt_suffix
from jobs.config import Config, PushGates, secret
from jobs.errors import T2SError
from jobs.rundir import RunDir, read_json, write_atomic
from jobs.credentials import known_secrets, redacted_bytes, redactor

RUN_FILES = ("config.resolved.yaml", "data/manifest.json", "prep.done", "train.done", "merge.done", "eval.done")
TRANSIENT_HTTP = (408, 429, 500, 502, 503, 504)

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


def without_secrets(files: list[FileToUpload], staging: Path) -> list[FileToUpload]:
    """The files with every secret hidden: a text file holding one (a log a library printed a token into) is
    replaced by a redacted copy under staging; a binary file holding a known secret value is refused."""
    known = known_secrets()
    hide = redactor(known)
    clean = []
    for file in files:
        try:
            hidden = redacted_bytes(file.local_path, hide, known)
        except ValueError as exc:
            raise T2SError(f"{exc}: nothing was pushed; remove the secret from that file and push again") from None
        if hidden is None:
            clean.append(file)
            continue
        copy = staging / file.path_in_repo
        copy.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(copy, hidden.decode("utf-8"))
        clean.append(FileToUpload(file.path_in_repo, copy, copy.stat().st_size))
    return clean


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


def read_eval_report(run: RunDir) -> dict | None:
    """The eval report, only when eval finished (a crashed eval's partial report is not shown)."""
    report_path = run.eval / "report.json"
    if not run.is_done("eval"):
        if report_path.is_file():
            print(f"note: {report_path} exists but eval did not finish (no eval.done): taken as not evaluated",
                  file=sys.stderr, flush=True)
        return None
    report = read_json(report_path)
    if report is None:
        raise T2SError(f"eval finished but {report_path} is missing: rerun `t2s eval --force`")
    return report


def gate_failures(report: dict | None, gates: PushGates, artifact: str) -> tuple[list[str], str]:
    """(what fails push.gates, what was measured) for the fine-tuned model's row of the eval report."""
    if report is None:
        return ["the run has no finished eval (`t2s eval`)"], "not evaluated"
    results = report.get("results") or {}
    # merged and adapter are the same model (merge checks their logits agree): either row speaks for the artifact
    label = next((name for name in (artifact, "merged", "adapter") if isinstance(results.get(name), dict)), None)
    if label is None:
        return ["the eval report has no score for the fine-tuned model (add merged to eval.models)"], "no score"
    model, base, failures = results[label], results.get("base"), []
    rows = {label: model, **({"base": base} if gates.not_worse_than_base and isinstance(base, dict) else {})}
    for name, row in rows.items():
        if not (_is_rate(row.get("sql_only")) and _is_rate(row.get("execution_accuracy"))):
            return [f"the eval report's {name} row lacks SQL-only or execution accuracy (rerun `t2s eval --force`)"], \
                "unreadable report"
    measured = (f"{label}: SQL-only {model['sql_only']:.1%}, execution accuracy {model['execution_accuracy']:.1%} on "
                f"{report.get('n_examples', '?')} {report.get('split', '?')} examples")
    if model["sql_only"] < gates.min_sql_only:
        failures.append(f"SQL-only {model['sql_only']:.1%} < push.gates.min_sql_only {gates.min_sql_only:.1%}")
    if model["execution_accuracy"] < gates.min_execution_accuracy:
        failures.append(f"execution accuracy {model['execution_accuracy']:.1%} < push.gates.min_execution_accuracy "
                        f"{gates.min_execution_accuracy:.1%}")
    if gates.not_worse_than_base:
        if not isinstance(base, dict):
            failures.append("no base model score to compare with (add base to eval.models, or set "
                            "push.gates.not_worse_than_base=false)")
        elif model["execution_accuracy"] < base["execution_accuracy"]:
            failures.append(f"execution accuracy {model['execution_accuracy']:.1%} < the base model's "
                            f"{base['execution_accuracy']:.1%} (push.gates.not_worse_than_base)")
    return failures, measured


def _is_rate(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def check_gates(cfg: Config, report: dict | None) -> None:
    """Refuses, in one line, to publish a model below push.gates, unless push.enforce_gates is false."""
    failures, measured = gate_failures(report, cfg.push.gates, cfg.push.artifact)
    if not failures:
        print(f"push.gates passed ({measured})", flush=True)
    elif cfg.push.enforce_gates:
        raise T2SError(f"not publishing run {cfg.run_id}: {'; '.join(failures)} ({measured}): improve the model or "
                       "change push.gates, or --set push.enforce_gates=false to publish it anyway")
    else:
        print(f"note: publishing although {'; '.join(failures)} (push.enforce_gates=false)", file=sys.stderr,
              flush=True)


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
    check_gates(cfg, report)
    template, special_tokens = read_chat_template(folder)
    suffix = trained_prompt_suffix(template, special_tokens) if template else None
    shown_id = repo_id or f"your-name/{cfg.run_id}"
    card = render_model_card(cfg, shown_id, report=report, train_done=read_json(run.marker("train")),
                             prompt_suffix=suffix)
    staging = run.root / "push"  # the card as pushed, kept beside the run; merged/ and adapter/ stay as they were
    staging.mkdir(exist_ok=True)
    card_path = staging / "README.md"
    write_atomic(card_path, card)

    files = without_secrets(files_to_upload(run, folder, card_path, evaluated=report is not None), staging / "redacted")
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
