"""The pod's own limits: after how long its job is stopped, and why, from the environment infra sets.

entrypoints/lib.sh runs `python3 -m infra.caps` as the job starts and arms a timer with the answer,
"<seconds>\t<reason>" (nothing when no cap applies). Time counts from the container's start: the pod cannot
see the image pull before it, which RunPod bills too; the launcher's watchdog counts from the pod's creation.
"""

from __future__ import annotations

import os
import sys


def pod_cap(max_runtime_min: float | None, max_cost_usd: float | None,
            cost_per_hr: float | None) -> tuple[float, str] | None:
    """(seconds, reason) of the first cap the job reaches, or None."""
    caps = []
    if max_runtime_min:
        caps.append((max_runtime_min * 60,
                     f"stopped by the pod's runtime cap (infra.max_runtime_min={max_runtime_min:g})"))
    if max_cost_usd and cost_per_hr:
        caps.append((max_cost_usd / cost_per_hr * 3600,
                     f"stopped by the pod's cost cap (infra.max_cost_usd={max_cost_usd:g} at ${cost_per_hr:g}/h)"))
    return min(caps) if caps else None


def _number(name: str, env: dict[str, str]) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
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
