"""The Hugging Face Hub as t2s talks to it (push, and t2s-infra's logs): what a repo id looks like, which failures
are the network's, and how long a request may stall.

huggingface_hub 1.x and later talk through one shared httpx client; 0.x (the cu118 set) through requests sessions.
Both are handled here, so that the callers need not know which is installed.
"""

from __future__ import annotations

import re
from pathlib import Path

from jobs.lib.config import Config, names_local_path
from jobs.lib.errors import T2SError

# "owner/name" of a model or dataset repo (the Hub's own rule for both parts).
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
HUB_ID = re.compile(rf"^{_PART}/{_PART}$")


def check_repo_id(repo_id: str | None, dry_run: bool) -> str | None:
    """push.repo_id as the Hub takes it for a model repo (push, and t2s-infra before a pod starts), or one line."""
    if repo_id is None:
        if dry_run:
            return None
        raise T2SError("push.repo_id is not set: add `push: {repo_id: your-name/model-name}` to the config, "
                       "or --set push.repo_id=your-name/model-name (--set push.dry_run=true shows what would go up)")
    if not HUB_ID.match(repo_id) or len(repo_id.split("/")[1]) > 96:
        raise T2SError(f"push.repo_id {repo_id!r} is not 'owner/name' of a model repo (letters, digits, '-', '_', "
                       "'.'; no URL and no datasets/ or spaces/ prefix): fix push.repo_id")
    return repo_id


def is_hub_id(name: str) -> bool:
    """Whether `name` is a Hub repo id rather than a local folder of that name."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


# A repo id as the Hub takes it for a model: "owner/name", or a bare legacy name ("gpt2").
_MODEL_ID = re.compile(rf"^(?:{_PART}/)?{_PART}$")
DEFAULT_RUNS_DIR = Config.model_fields["runs_dir"].default


def names_local_model(name: str) -> bool:
    """Whether a --model name means something on this machine, so that a missing one is one line at once rather than
    a Hub lookup with its retries: a path (./x, /x, ~/x, a/b/c, x/), anything that is not a Hub repo id, or an id whose
    first part is a folder here or the runs folder (runs/nope: a run that is not there, not the user "runs")."""
    if names_local_path(name) or not _MODEL_ID.match(name):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and (first == DEFAULT_RUNS_DIR or Path(first).expanduser().is_dir())


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Connection failures and timeouts, from whichever HTTP client this huggingface_hub uses."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests.exceptions", "ConnectionError"), ("requests.exceptions", "Timeout")):
        try:
            types.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def causes(exc: BaseException):
    """The exception and the ones it was raised from (or while handling), outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None else None if exc.__suppress_context__ else exc.__context__


def network_error(exc: BaseException) -> BaseException | None:
    """The connection failure or timeout behind `exc` (the network's fault, worth a retry), or None."""
    return next((cause for cause in causes(exc) if isinstance(cause, _network_error_types())), None)


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of the Hub's answer behind `exc` (huggingface_hub's errors carry the response), or None."""
    for cause in causes(exc):
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
    return None


def use_request_timeout(seconds: float) -> None:
    """A request that stalls fails after `seconds` (and is retried) instead of waiting forever, which is
    huggingface_hub's default for its API calls (HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT bound downloads only).
    Set through the library's public client configuration."""
    import huggingface_hub

    if hasattr(huggingface_hub, "set_client_factory"):  # 1.x and later: one shared httpx client, reused by threads
        huggingface_hub.close_session()  # the next request builds the client afresh, with the library's own setup
        huggingface_hub.get_session().timeout = seconds
    else:  # 0.x: a requests session per thread, from the factory; requests takes timeouts per request only
        import requests

        class DefaultTimeout(requests.adapters.HTTPAdapter):
            def send(self, request, timeout=None, **kwargs):
                return super().send(request, timeout=timeout or seconds, **kwargs)

        def session() -> requests.Session:
            built = requests.Session()
            for prefix in ("http://", "https://"):
                built.mount(prefix, DefaultTimeout())
            return built

        huggingface_hub.configure_http_backend(backend_factory=session)
