"""Greedy vs checked decoding (jobs.lib.checked) on one model: quality and speed, as `t2s eval` measures them.

The default run (greedy + checked at 4 and 8 candidates, all rows; ~150 s on one H200 for the 1,090 validation rows
with the SmolLM2-135M merged model, imports and loading included):

    python bench/checked_decoding.py --model RUN/merged --rows DATA/validation.jsonl --out $OUT

Greedy answers are generated once (jobs.lib.generate.generate_batched, timed after an untimed pass over the same rows);
each checked run starts from them as eval does, so its time is the greedy time plus its checks and beam search (timed
apart). Every mode is scored like eval (jobs.eval.score_answers: SQL-only, exact match, execution accuracy on 3
generated databases, the share of predictions that fail to execute). A checked run that would start past --deadline
seconds is skipped and said so. The command is printed first; $OUT gets checked_decoding.json (every figure, the time
breakdown, how many questions each mode changed) and checked_decoding.md; the last lines printed are the table.
Try it on a CPU first with the tiny model:

    python bench/checked_decoding.py --model runs/demo/merged --rows runs/demo/data/test.jsonl --out /tmp/cd \\
        --max-examples 24 --max-new-tokens 48 --candidates 2,3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STARTED = time.perf_counter()  # before the heavy imports: --deadline and total_s count them
import torch  # noqa: E402

from jobs.lib import candidates, checked  # noqa: E402
from jobs.lib.chat import render_prompt  # noqa: E402
from jobs.lib.config import EvalConfig  # noqa: E402
from jobs.lib.errors import T2SError  # noqa: E402
from jobs.eval import score_answers, scoring_workers, summarize  # noqa: E402
from jobs.lib.generate import generate_batched  # noqa: E402
from jobs.lib.models import default_device  # noqa: E402
from jobs.lib.models import load_model, load_tokenizer, pick_dtype  # noqa: E402
from jobs.lib.sandbox import Sandbox  # noqa: E402


def candidate_counts(text: str) -> list[int]:
    try:
        return [checked.check_candidates_count(int(c)) for c in text.split(",")]
    except (ValueError, T2SError) as error:
        raise argparse.ArgumentTypeError(f"want whole numbers of at least 1, comma-separated, e.g. 4,8 ({error})")


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"want a whole number of at least 1, got {text!r}")
    return int(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (a run's merged/)")
    parser.add_argument("--rows", required=True, help="JSONL rows with question, context, answer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--candidates", type=candidate_counts, default=[4, 8],
                        help="checked decoding's candidate counts, comma-separated (default 4,8; eval's default is 4)")
    parser.add_argument("--max-examples", "--max-rows", type=at_least_one, default=None, dest="max_examples",
                        help="score only the first N rows (default: all)")
    parser.add_argument("--batch-size", type=at_least_one, default=2048,
                        help="as configs/smollm2.yaml: one batch of 1,090")
    parser.add_argument("--max-new-tokens", type=at_least_one, default=128)
    parser.add_argument("--workers", type=at_least_one, default=None, help="sandbox workers (default: eval's choice)")
    parser.add_argument("--device", default=None, help="default: the GPU when there is one")
    parser.add_argument("--deadline", type=float, default=100.0,
                        help="seconds after start: no checked run starts later (default 100: the run ends by ~150 s)")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no model folder there (want a run's merged/, with config.json)")
    if not Path(args.rows).is_file():
        parser.error(f"--rows {args.rows}: no such file (want JSONL rows with question, context, answer)")
    return args


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here)"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def scores_of(rows: list[dict], texts: list[str], sandbox: Sandbox) -> tuple[list[dict], dict]:
    scored = score_answers(rows, texts, EvalConfig(), sandbox)
    return scored, summarize(scored)


def main() -> None:
    args = parse_args()
    counts = args.candidates
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print("command: python " + shlex.join(sys.argv), flush=True)

    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()][:args.max_examples]
    device = args.device or default_device()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=pick_dtype("auto") if device.startswith("cuda") else torch.float32)
    model = model.to(device).eval()
    prompts = [render_prompt(tokenizer, row["context"], row["question"]) for row in rows]
    contexts = [row["context"] for row in rows]
    workers = args.workers or scoring_workers()
    setup = {
        "commit": commit(), "model": args.model, "rows": args.rows, "n": len(rows), "device": (
            torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"),
        "dtype": str(next(model.parameters()).dtype), "torch": torch.__version__,
        "transformers": version("transformers"), "sqlglot": version("sqlglot"), "python": platform.python_version(),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "sandbox_workers": workers,
    }
    print(json.dumps(setup), flush=True)

    with Sandbox(workers=workers) as sandbox:
        # warm-up, untimed: the whole greedy pass once (kernels, allocator growth, a fast decoder's graph capture for
        # this batch shape), a small beam search, the sandbox workers' imports
        warm = generate_batched(model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
        candidates.search_with_model(model, tokenizer, prompts[:2], warm[:2], 2, 8, 8)
        list(sandbox.map(checked.check_candidate, [(contexts[0], rows[0]["answer"], "eos", 0)] * workers,
                         checked.verdict_after_kill))
        synchronize()

        clock = time.perf_counter()
        greedy = generate_batched(model, tokenizer, prompts, args.batch_size, args.max_new_tokens)
        synchronize()
        greedy_s = time.perf_counter() - clock
        _, greedy_scores = scores_of(rows, [g.text for g in greedy], sandbox)
        results = {"greedy": {**greedy_scores, "seconds": greedy_s, "queries_per_s": len(rows) / greedy_s,
                              "hit_token_limit": sum(g.ended_at_eos is False for g in greedy) / len(rows)}}
        print(f"greedy: {greedy_s:.2f} s, execution accuracy {greedy_scores['execution_accuracy']:.1%}", flush=True)

        for count in counts:
            name = f"checked, {count} candidates"
            if time.perf_counter() - STARTED > args.deadline:
                print(f"{name}: skipped (past --deadline {args.deadline:g} s)", flush=True)
                continue
            search_s = []

            def search(indices: list[int]) -> list[list]:
                clock = time.perf_counter()
                found = candidates.search_with_model(model, tokenizer, [prompts[i] for i in indices],
                                                     [greedy[i] for i in indices], count, args.batch_size,
                                                     args.max_new_tokens)
                synchronize()
                search_s.append(time.perf_counter() - clock)
                return found

            clock = time.perf_counter()
            choices = checked.choose_answers(contexts, greedy, search, sandbox, candidates=count)
            extra_s = time.perf_counter() - clock
            _, scores = scores_of(rows, [c.text for c in choices], sandbox)
            seconds = greedy_s + extra_s
            results[name] = {
                **scores, "candidates": count, "seconds": seconds, "queries_per_s": len(rows) / seconds,
                "greedy_s": greedy_s, "search_s": sum(search_s), "checks_s": extra_s - sum(search_s),
                "searched": sum(not c.tried[0][1].passed for c in choices) / len(rows),
                "passed_checks": sum(c.checked for c in choices) / len(rows),
                "changed_answers": sum(c.text != g.text for c, g in zip(choices, greedy)),
                "failed_checks": dict(sorted(_count(v.failed for c in choices for _, v in c.tried[:1]
                                                    if not v.passed).items())),
            }
            print(f"{name}: {seconds:.2f} s (greedy {greedy_s:.2f} + checks {extra_s - sum(search_s):.2f} + search "
                  f"{sum(search_s):.2f}), execution accuracy {scores['execution_accuracy']:.1%}", flush=True)

    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    report = {"setup": {**setup, "peak_gpu_memory_gib": peak, "total_s": time.perf_counter() - STARTED},
              "results": results}
    (out / "checked_decoding.json").write_text(json.dumps(report, indent=2) + "\n")
    table = render_table(results)
    (out / "checked_decoding.md").write_text(table + "\n")
    print(f"\n{len(rows)} rows of {args.rows} · {setup['device']} · commit {setup['commit']} · total "
          f"{report['setup']['total_s']:.0f} s\n{table}", flush=True)


def _count(items) -> dict:
    counts: dict = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _share(value) -> str:
    return "" if value is None else f"{value:.1%}"


def render_table(results: dict) -> str:
    greedy_qps = results["greedy"]["queries_per_s"]
    lines = ["| decoding | SQL-only | exact match | execution accuracy | fails to execute | queries/s | × greedy "
             "| greedy failed checks | passed checks | time: greedy + checks + search |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        time_split = (f"{r['greedy_s']:.1f} + {r['checks_s']:.1f} + {r['search_s']:.1f} s" if "greedy_s" in r
                      else f"{r['seconds']:.1f} s")
        lines.append(f"| {name} | {r['sql_only']:.1%} | {r['exact_match']:.1%} | {r['execution_accuracy']:.1%} | "
                     f"{r['fails_to_execute']:.1%} | {r['queries_per_s']:.1f} | "
                     f"{r['queries_per_s'] / greedy_qps:.2f} | {_share(r.get('searched'))} | "
                     f"{_share(r.get('passed_checks'))} | {time_split} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
