"""push: the merged model (or the adapter), a model card (jobs.lib.card), the eval report and the logs, to a
Hugging Face Hub model repo (private unless push.private=false).

    repo path                     ← run directory
    README.md                     ← the model card, rendered into runs/<id>/push/ (never into merged/ or adapter/)
    *.safetensors, config.json,   ← merged/ (push.artifact=merged, the default) or adapter/ (push.artifact=adapter);
    tokenizer*, chat template,       their own README.md, if any, gives way to the card
    generation_config.json
    eval/...                      ← eval/, only when eval finished (otherwise the card says "not evaluated")
    logs/...                      ← logs/ (each job's log and the config it ran with), except push.log: this job's own
    run/...                       ← config.resolved.yaml (the settings the run was made with), data/manifest.json and
                                     the jobs' .done markers (train.done: the settings train really used)

Needs a finished train (its record is the card's training table), a finished merge (merged) and a finished eval whose
scores for the fine-tuned model pass push.gates (SQL-only, execution accuracy, not worse than the base): a broken model
is never published. A model below the gates, or not evaluated, goes up only with push.enforce_gates=false (the card
then says "not evaluated" where there is no report). Dry runs check the gates too: they show what a real push would do.
The token comes only from HF_TOKEN and goes only into huggingface_hub's request headers: it is never
printed, logged or written, and every Hub failure becomes a one-line message of our own (the library's
messages carry URLs and server text). Local files are only read, so a failed push loses nothing.
Every file goes into one commit; huggingface_hub leaves out the files the repo already has (it compares their hashes
with the ones the Hub reports) and makes no commit when nothing changed, so a rerun with unchanged content uploads
nothing. (`t2s push` after a finished push is skipped by the CLI, as every finished job is; `--force` pushes again.)
Network failures and 408/429/5xx answers are retried push.retries times with exponential backoff (tenacity; base
push.backoff_s, default 2 s); push.timeout_s (default 300 s) bounds a stalled request. T2S_PUSH_BACKOFF_S and
T2S_PUSH_TIMEOUT_S still set them, over the config (jobs.lib.config.ENVIRONMENT_KEYS).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from jobs.lib.card import read_chat_template, render_model_card, run_span_s, trained_prompt_suffix
from jobs.lib.config import Config, PushGates, secret
from jobs.lib.errors import T2SError
from jobs.lib.credentials import known_secrets, redact, redacted_bytes, redactor
from jobs.lib.hub import causes, check_repo_id, http_status, network_error, use_request_timeout
from jobs.lib.rundir import JOBS, RunDir, read_json, write_atomic

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
        folder, job = run.trained_model(), "rl" if run.is_done("rl") else "train"
        if run.trained() != "adapter":
            raise T2SError(f"push.artifact=adapter, but {folder} holds a full fine-tune (no adapter_config.json): "
                           "set push.artifact=merged")
    if not any(folder.glob("*.safetensors")):
        raise T2SError(f"{folder} has no *.safetensors weights: rerun `t2s {job} --force`")
    return folder


def run_record_files(run: RunDir) -> list[tuple[str, Path]]:
    """(name under run/, local file) of the run's own record: its settings, the data manifest, the jobs' markers."""
    files = [run.settings_file, run.manifest, *(run.marker(job) for job in JOBS if job != "push")]
    return [(path.relative_to(run.root).as_posix(), path) for path in files if path.is_file()]


def files_to_upload(run: RunDir, folder: Path, card: Path, evaluated: bool) -> list[FileToUpload]:
    files = [FileToUpload("README.md", card, card.stat().st_size)]
    files += _folder_files(folder, "", skip=("README.md",))
    if evaluated:
        files += _folder_files(run.eval, "eval/")
    files += _folder_files(run.logs, "logs/", skip=(run.job_log("push").name,))
    files += [FileToUpload(f"run/{name}", path, path.stat().st_size) for name, path in run_record_files(run)]
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
    """A table of what goes up: size, path in the repo, local file; and the total."""
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    for f in files:
        table.add_row(human_size(f.size), f.path_in_repo, f"← {f.local_path}")
    table.add_row(human_size(sum(f.size for f in files)), f"{len(files)} files", "")
    console = Console(width=1_000, no_color=True, highlight=False, markup=False, emoji=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join("  " + line.rstrip() for line in captured.get().splitlines())


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


@dataclass(frozen=True)
class PushResult:
    commit: str  # the repo's head after the push
    new_commit: bool  # False: the repo already had every file, so no commit was made


def push_to_hub(api, repo_id: str, files: list[FileToUpload], *, private: bool, message: str,
                attempts: int, backoff_s: float) -> PushResult:
    """Creates the repo if needed and commits the files; one-line T2SError on failure."""
    from huggingface_hub import CommitOperationAdd

    step = "creating the repo"
    try:
        info = with_retries(lambda: ensure_model_repo(api, repo_id, private), step, attempts, backoff_s)
        if info.private is False and private:
            print(f"note: {repo_id} already exists and is public; push.private only applies when t2s creates the repo",
                  file=sys.stderr, flush=True)
        step = "uploading and committing"
        # The whole commit is retried: if one landed but its answer was lost, the retry finds every file already
        # there, and huggingface_hub makes no second commit.
        commit = with_retries(lambda: api.create_commit(
            repo_id, repo_type="model", commit_message=message,
            operations=[CommitOperationAdd(f.path_in_repo, str(f.local_path)) for f in files]), "uploading",
            attempts, backoff_s)
        return PushResult(commit.oid, new_commit=commit.oid != info.sha)
    except T2SError:
        raise
    except Exception as exc:
        raise T2SError(hub_failure(exc, repo_id=repo_id, step=step, attempts=attempts, endpoint=api.endpoint)) from None


def with_retries(action: Callable[[], T], what: str, attempts: int, backoff_s: float) -> T:
    """`action()`, again after a network failure or a 408/429/5xx answer, up to `attempts` times in all, waiting
    backoff_s, 2 × backoff_s, ... (at most 60 s) in between; each retry is one line on stderr."""
    import tenacity

    def say(state: tenacity.RetryCallState) -> None:
        print(f"push: {what} failed ({transient_reason(state.outcome.exception())}); retry "
              f"{state.attempt_number}/{attempts - 1} in {state.next_action.sleep:g} s", file=sys.stderr, flush=True)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=backoff_s, max=60.0),
        retry=tenacity.retry_if_exception(lambda exc: transient_reason(exc) is not None),
        before_sleep=say, reraise=True)
    return retrying(action)


def transient_reason(exc: BaseException) -> str | None:
    """Why a failure is worth retrying (a network error, or HTTP 408/429/5xx); None when it is not."""
    if isinstance(exc, T2SError):
        return None
    status = http_status(exc)
    if status is not None:
        return f"HTTP {status}" if status in TRANSIENT_HTTP else None
    failure = network_error(exc)
    return type(failure).__name__ if failure is not None else None


def hub_failure(exc: BaseException, *, repo_id: str, step: str, attempts: int, endpoint: str) -> str:
    """Our own one-line message for a failed Hub call: never the library's text (URLs, headers), never the token."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if any(isinstance(c, OfflineModeIsEnabled) for c in causes(exc)):
        return "HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, or use push.dry_run=true"
    status = http_status(exc)
    if status is not None:
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
        http = next((c for c in causes(exc) if isinstance(c, HfHubHTTPError)), None)
        server = _shown(getattr(http, "server_message", None) or "")
        return (f"the Hub refused {step} for {repo_id} (HTTP {status}{': ' + server if server else ''}): "
                "check push.repo_id and the repo's settings on the Hub")
    transport = network_error(exc)
    if transport is not None:
        return (f"could not reach the Hub at {endpoint} while {step} after {attempts} attempt(s) "
                f"({type(transport).__name__}): check the network (or HF_ENDPOINT / proxy settings) and rerun "
                "`t2s push`; local files are untouched")
    detail = _shown(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return f"push to {repo_id} failed while {step}: {type(exc).__name__}{': ' + detail if detail else ''}"


def _shown(text: str) -> str:
    """A server's or a library's text, fit for our one line: every secret hidden, one line, short."""
    return " ".join(redact(text).split())[:200]


# ---------------------------------------------------------------- the job


def read_eval_report(run: RunDir) -> dict | None:
    """The eval report, only when eval finished (a crashed eval's partial report is not shown)."""
    report_path = run.report
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
    failures += sample_failures(report.get("split"), model, gates.min_rows)
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


def sample_failures(split, row: dict, min_rows: int) -> list[str]:
    """Why the rows a score rests on cannot support a claim about new questions: the training split (the model has
    seen those answers), a split not recorded, or fewer rows than push.gates.min_rows under the execution accuracy
    (the examples scored, less those whose tables or reference query fail)."""
    failures = []
    if split not in ("validation", "test"):
        failures.append(f"the eval ran on the {split} split, which the model was trained on: evaluate a held-out split "
                        "(eval.split: test or validation)" if split == "train" else
                        "the eval report does not say which split it ran on (rerun `t2s eval --force`)")
    counts = [row.get("n"), row.get("gold_error", 0), row.get("build_error", 0)]
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        return failures + ["the eval report does not say how many rows it scored (rerun `t2s eval --force`)"]
    executed = counts[0] - counts[1] - counts[2]
    if executed < min_rows:
        failures.append(f"execution accuracy rests on {max(executed, 0)} rows < push.gates.min_rows {min_rows} "
                        "(evaluate more rows: raise or unset eval.max_examples)")
    return failures


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


def check(cfg: Config, run: RunDir) -> None:
    """Everything a push needs, before anything is written or sent: a repo id, a token, the artifact, train's record
    (the card's training table), and a model that passes push.gates."""
    from huggingface_hub import constants

    check_repo_id(cfg.push.repo_id, cfg.push.dry_run)
    if not cfg.push.dry_run:
        if not secret("HF_TOKEN"):
            raise T2SError("HF_TOKEN is not set: put a Hub token with write access in the environment or in .env "
                           "(HF_TOKEN=...), or use --set push.dry_run=true")
        if constants.HF_HUB_OFFLINE:
            raise T2SError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it, or use push.dry_run=true")
    artifact_folder(cfg, run)
    run.require("train", "push")
    if "gguf" in cfg.push.artifacts:
        run.require("export", "push of the GGUF files (push.artifacts: [gguf])")
    check_gates(cfg, read_eval_report(run))


def card_config(cfg: Config, run: RunDir) -> Config:
    """What the card describes: push's own settings, with the model, data and train settings the model was trained
    with as train recorded them, whatever the config given to push says about those."""
    trained = {section: values for section, values in run.trained_settings().items()
               if section in ("model", "data", "train") and isinstance(values, dict)}
    try:
        return Config.model_validate(_overlay(cfg.model_dump(mode="json"), trained))
    except ValueError:  # a record from another version of t2s that this one cannot read
        print(f"note: {run.marker('train')} records settings this t2s cannot read; the card's training table shows "
              "push's config", file=sys.stderr, flush=True)
        return cfg


def _overlay(base: dict, top: dict) -> dict:
    return {**base, **{k: _overlay(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in top.items()}}


def run(cfg: Config, run: RunDir) -> str:
    push = cfg.push
    repo_id = check_repo_id(push.repo_id, push.dry_run)
    folder = artifact_folder(cfg, run)
    report = read_eval_report(run)
    template, special_tokens = read_chat_template(folder)
    suffix = trained_prompt_suffix(template, special_tokens) if template else None
    shown_id = repo_id or f"your-name/{cfg.run_id}"
    card = render_model_card(card_config(cfg, run), shown_id, report=report,
                             train_done=read_json(run.marker("train")), prompt_suffix=suffix,
                             run_span_s=run_span_s(run), training_curves=report is not None and (
                                 run.eval / "training_curves.png").is_file(), rl_done=read_json(run.marker("rl")),
                             export_done=read_json(run.marker("export")) if "gguf" in push.artifacts else None)
    run.pushed.mkdir(exist_ok=True)
    card_path = run.pushed / "README.md"
    write_atomic(card_path, card)

    files = files_to_upload(run, folder, card_path, evaluated=report is not None)
    if "gguf" in push.artifacts:  # t2s export's files and Modelfile (jobs.export)
        files += _folder_files(run.root / "export", "gguf/")
    files = without_secrets(files, run.pushed / "redacted")
    total = human_size(sum(f.size for f in files))
    visibility = "private" if push.private else "public"
    print(f"{push.artifact} model from {folder}{'' if report else ' (not evaluated)'} → {shown_id} ({visibility}):",
          flush=True)
    print(describe_files(files), flush=True)
    if push.dry_run:
        return (f"dry run: {len(files)} files ({total}) would go to {repo_id or '(push.repo_id not set)'} "
                f"({visibility}); card in {card_path}")

    from huggingface_hub import HfApi

    token = secret("HF_TOKEN")
    use_request_timeout(push.timeout_s)
    api = HfApi(token=token)  # endpoint: HF_ENDPOINT, else huggingface.co
    result = push_to_hub(api, repo_id, files, private=push.private,
                         message=f"t2s push: run {cfg.run_id} ({push.artifact})",
                         attempts=push.retries + 1, backoff_s=push.backoff_s)
    url = f"{api.endpoint}/{repo_id}"
    run.finish("push", cfg, repo_id=repo_id, url=url, commit=result.commit, artifact=push.artifact,
               evaluated=report is not None, files=len(files), new_commit=result.new_commit)
    short = result.commit[:8]
    if not result.new_commit:
        return f"{url} already has these {len(files)} files (commit {short}): nothing uploaded, no new commit"
    return f"pushed {len(files)} files to {url} (commit {short}; files the repo already had were not sent)"
