"""The pod's own limits: after how long its job is stopped, and why, from the environment infra sets.

entrypoints/lib.sh runs `python3 -m infra.caps` as the job starts and arms a timer with the answer,
"<seconds>\t<reason>" (nothing when no cap applies). Time counts from the container's start: the pod cannot
see the image pull before it, which RunPod bills too; the launcher's watchdog counts from the pod's creation.
"""

from __future__ import annotations

import math
import os
import sys

# The largest caps infra.settings accepts (a week of runtime, $10,000), shared with it. The pod holds to them too,
# whatever its environment says: a cap read as infinite or past them is taken at the bound, so a timer is always armed.
MAX_RUNTIME_MIN = 7 * 24 * 60.0
MAX_COST_USD = 10_000.0


def pod_cap(max_runtime_min: float | None, max_cost_usd: float | None,
            cost_per_hr: float | None) -> tuple[float, str] | None:
    """(seconds, reason) of the first cap the job reaches, or None. Never more than MAX_RUNTIME_MIN."""
    caps = []
    if max_runtime_min:
        caps.append((max_runtime_min * 60,
                     f"stopped by the pod's runtime cap (infra.max_runtime_min={max_runtime_min:g})"))
    if max_cost_usd and cost_per_hr:
        caps.append((max_cost_usd / cost_per_hr * 3600,
                     f"stopped by the pod's cost cap (infra.max_cost_usd={max_cost_usd:g} at ${cost_per_hr:g}/h)"))
    caps = [(math.inf if math.isnan(seconds) else seconds, reason) for seconds, reason in caps]
    if not caps:
        return None
    seconds, reason = min(caps)
    if not seconds <= MAX_RUNTIME_MIN * 60:  # an infinite cap, or a price so low the cost cap is years away
        return MAX_RUNTIME_MIN * 60, f"stopped by the pod's runtime cap ({MAX_RUNTIME_MIN:g} min, the most allowed)"
    return seconds, reason


def _number(name: str, env: dict[str, str]) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if math.isnan(value):
        return math.inf  # unreadable as a limit: the longest one (pod_cap)
    return value if value > 0 else None


def cap_from_env(env: dict[str, str]) -> tuple[float, str] | None:
    return pod_cap(_number("T2S_MAX_RUNTIME_MIN", env), _number("T2S_MAX_COST_USD", env),
                   _number("T2S_COST_PER_HOUR_USD", env))


def main() -> int:
    try:
        cap = cap_from_env(dict(os.environ))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if cap:
        seconds, reason = cap
        print(f"{max(1, round(seconds))}\t{reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
