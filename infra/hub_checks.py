"""What the launch asks the Hub before a pod starts: whose HF_TOKEN it is (and what it may write), and whether it may
read the model and the dataset the run names; and the one line for a Hub call that failed (infra.logs's too).
"""

from __future__ import annotations

from collections.abc import Callable

from huggingface_hub import HfApi
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

from jobs.lib.errors import T2SError
from jobs.lib.hub import http_status, network_error


def hub_whoami(token: str) -> dict:
    """The Hub's `whoami-v2` answer for this token (HF_ENDPOINT, else huggingface.co); one line when it fails."""
    hub = HfApi(token=token)
    try:
        return hub.whoami()
    except Exception as exc:
        if http_status(exc) == 401:
            raise T2SError("the Hub does not accept HF_TOKEN (HTTP 401: unknown, revoked or mistyped): put a token "
                           "with write access from https://huggingface.co/settings/tokens in .env") from None
        raise hub_error(exc, lambda status: f"the Hub answered HTTP {status} when asked who HF_TOKEN belongs to: "
                         "try again", lambda error: f"cannot reach the Hugging Face Hub to check HF_TOKEN ({error}): "
                         "check the network (or HF_ENDPOINT) and try again") from None


def hub_access(token: str, repo_id: str, repo_type: str) -> str:
    """Whether HF_TOKEN may read this Hub repo, as the pod will: "ok", "gated" (a gated repo whose access was not
    granted to the token's user) or "missing" (no such repo, or private to others). One line when the Hub cannot say."""
    try:
        HfApi(token=token).auth_check(repo_id, repo_type=repo_type)
    except GatedRepoError:  # (a RepositoryNotFoundError too: caught first)
        return "gated"
    except RepositoryNotFoundError:
        return "missing"
    except Exception as exc:
        raise hub_error(exc, lambda status: f"the Hub answered HTTP {status} when asked whether HF_TOKEN may read "
                         f"{repo_type} {repo_id}: try again", lambda error: f"cannot reach the Hugging Face Hub to "
                         f"check {repo_type} {repo_id} ({error}): check the network and try again") from None
    return "ok"


def hub_error(exc: Exception, answered: Callable[[str], str], unreachable: Callable[[str], str]) -> T2SError:
    """The one line for a failed Hub call: answered(status) when the Hub answered (huggingface_hub 1.x raises
    HfHubHTTPError, 0.x a requests.HTTPError: both carry the response), unreachable(error type) when it could not be
    reached. Anything else is a bug: it is raised again, with its traceback."""
    status = http_status(exc)
    if status is not None or isinstance(exc, HfHubHTTPError):
        return T2SError(answered(str(status or "?")))
    if network_error(exc) is None:
        raise exc
    return T2SError(unreachable(type(exc).__name__))
