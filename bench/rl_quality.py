"""SFT vs SFT+RL (t2s rl: GRPO with execution rewards) from one SFT run, and vote decoding at two N (issue 25).

One call on one H100/H200 with the SmolLM2-135M stand-in (configs/smollm2.yaml, validation, all rows):
  prep → train → merge → eval (greedy + checked)                          the SFT model
  rl → merge → eval (greedy + checked + vote at N1) → eval (+ vote at N2)    SFT+RL, from the same SFT checkpoint
and prints one table: SQL-only, exact match, execution accuracy, fails to execute, the join / 2-table / 3+-table
buckets' execution accuracy, queries/s; and RL's wall time beside SFT's. Reports and markers go to OUT.

GPU time (estimate from bench/RESULTS.md §2, H200: SFT 140 s, 197 greedy queries/s): prep+train ~170 s, merge+eval
~50 s, rl ~120 s (--rl-steps 30 x 16 prompts x 8 completions, max 96 new tokens: about 4 s a step, host-bound
generation), merge+eval with vote N=4 ~70 s, eval with vote N=8 ~80 s: about 8 minutes. Lower --rl-steps if it runs
long; the rl settings are also --set-able (e.g. --set rl.learning_rate=2e-6).

    python bench/rl_quality.py --shared .devshared --out $OUT                 # on the GPU machine
    python bench/rl_quality.py --smoke --out /tmp/rl-smoke                    # on a CPU: the tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = ("join", "tables=2", "tables=3+")


def t2s(job: str, config: Path, sets: list[str], force: bool = False) -> None:
    command = [sys.executable, "-m", "jobs.cli", job, "--config", str(config), *[f"--set={s}" for s in sets]]
    started = time.monotonic()
    result = subprocess.run(command + (["--force"] if force else []), cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "it/s]" not in line and line.strip()]
    print("\n".join(lines[-6:]), flush=True)
    print(f"[{job}: {time.monotonic() - started:.0f} s, exit {result.returncode}]", flush=True)
    if result.returncode != 0:
        sys.exit(f"t2s {job} failed (exit {result.returncode})")


def rows_of(report: dict, label: str, name: str) -> dict:
    r = report["results"][label]
    buckets = report["buckets"][label]
    return {"model": name, "decoding": r.get("decoding", "greedy") + (f" N={r['samples']}" if "samples" in r else ""),
            "sql_only": r["sql_only"], "exact_match": r["exact_match"], "execution_accuracy": r["execution_accuracy"],
            "fails_to_execute": r.get("fails_to_execute"), "queries_per_s": r["queries_per_s"],
            **{b: buckets[b]["execution_accuracy"] if b in buckets else None for b in BUCKETS},
            **{f"n_{b}": buckets[b]["n"] if b in buckets else 0 for b in BUCKETS}}


def table(rows: list[dict]) -> str:
    def pct(v):
        return f"{v:.1%}" if isinstance(v, (int, float)) else "-"

    head = ("| model | decoding | SQL-only | exact | exec | fails to execute | "
            + " | ".join(f"{b} (n={rows[0][f'n_{b}']})" for b in BUCKETS) + " | queries/s |")
    lines = [head, "|---|---|" + "---:|" * (5 + len(BUCKETS))]
    for r in rows:
        lines.append(f"| {r['model']} | {r['decoding']} | {pct(r['sql_only'])} | {pct(r['exact_match'])} | "
                     f"{pct(r['execution_accuracy'])} | {pct(r['fails_to_execute'])} | "
                     + " | ".join(pct(r[b]) for b in BUCKETS) + f" | {r['queries_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=".devshared", help="the shared folder (its data/sql-create-context)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="/tmp/bench-rl")
    parser.add_argument("--rl-steps", type=int, default=30)
    parser.add_argument("--votes", default="4,8", help="the two vote sample counts N")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on synthetic data, on a CPU")
    parser.add_argument("--keep", action="store_true",
                        help="continue the run in --runs (a call cut by its time limit) instead of starting afresh")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="more config overrides")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n1, n2 = (int(n) for n in args.votes.split(","))
    if not args.keep:
        shutil.rmtree(Path(args.runs) / "rl", ignore_errors=True)
    common = [f"runs_dir={args.runs}", "run_id=rl", "eval.models=[merged]", "eval.split=validation"]
    rl = [f"rl.max_steps={args.rl_steps}", "rl.group_size=8", "rl.prompts_per_step=16", "rl.max_completion_length=96",
          "rl.learning_rate=1e-5", "rl.beta=0.0", "rl.temperature=1.0", "rl.logging_steps=5",
          f"rl.save_every_steps={max(args.rl_steps // 2, 1)}", "rl.reward_workers=8"]
    if args.smoke:
        config = ROOT / "configs" / "demo.yaml"
        common += ["model.name_or_path=tiny", "data.source=synthetic", "data.synthetic_rows=300", "data.max_length=256",
                   "train.method=lora", "train.max_steps=20", "train.per_device_batch_size=8", "train.packing=none",
                   "train.early_stopping_patience=null", "train.eval_every_steps=null", "train.save_every_steps=null",
                   "train.learning_rate=3e-3", "eval.max_examples=12", "eval.batch_size=12", "eval.max_new_tokens=24"]
        rl = [f"rl.max_steps={min(args.rl_steps, 2)}", "rl.group_size=2", "rl.prompts_per_step=2",
              "rl.max_completion_length=16", "rl.logging_steps=1", "rl.save_every_steps=2", "rl.reward_workers=2"]
    else:
        config = ROOT / "configs" / "smollm2.yaml"
        common += [f"data.source={args.shared}/data/sql-create-context"]
    sets = common + rl + args.sets
    run = Path(args.runs) / "rl"

    for job in ("prep", "train", "merge"):
        t2s(job, config, sets)
    t2s("eval", config, sets + ["eval.decoding=checked"])
    kept = Path(args.runs) / "sft_report"  # SFT's report, beside the run: evals after rl replace run/eval (--keep)
    if not (args.keep and kept.with_suffix(".json").is_file() and (run / "rl.done").is_file()):
        for suffix in (".json", ".md"):
            shutil.copy((run / "eval" / "report").with_suffix(suffix), kept.with_suffix(suffix))
    sft = json.loads(kept.with_suffix(".json").read_text())
    shutil.copy(kept.with_suffix(".md"), out / "sft_report.md")
    t2s("rl", config, sets)
    t2s("merge", config, sets)
    t2s("eval", config, sets + ["eval.decoding=vote", f"eval.vote_samples={n1}"])
    first = json.loads((run / "eval" / "report.json").read_text())
    shutil.copy(run / "eval" / "report.md", out / f"rl_vote{n1}_report.md")
    t2s("eval", config, sets + ["eval.decoding=vote", f"eval.vote_samples={n2}"], force=True)
    second = json.loads((run / "eval" / "report.json").read_text())
    shutil.copy(run / "eval" / "report.md", out / f"rl_vote{n2}_report.md")

    rows = [rows_of(sft, "merged", "SFT"), rows_of(sft, "merged+checked", "SFT"),
            rows_of(first, "merged", "SFT+RL"), rows_of(first, "merged+checked", "SFT+RL"),
            rows_of(first, "merged+vote", "SFT+RL"), rows_of(second, "merged+vote", "SFT+RL")]
    train_done = json.loads((run / "train.done").read_text())
    rl_done = json.loads((run / "rl.done").read_text())
    timing = (f"SFT train {train_done['train_runtime_s']:.0f} s ({train_done['global_step']} steps); RL "
              f"{rl_done['rl_runtime_s']:.0f} s ({rl_done['global_step']} GRPO steps, mean reward "
              f"{rl_done['first_reward']:.3f} -> {rl_done['last_reward']:.3f}); device "
              f"{first.get('device')}; {len(rows)} rows on {first['n_examples']} {first['split']} examples")
    steps = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()
             if '"stage": "rl"' in line]
    step_s = [r["step_time"] for r in steps if isinstance(r.get("step_time"), (int, float))]
    if step_s:
        timing += (f"; RL step {sum(step_s) / len(step_s):.1f} s on average (sampling, rewards, update), "
                   f"completions {steps[-1].get('completions/mean_length', 0):.0f} tokens long at the end")
    text = table(rows) + "\n\n" + timing + "\n"
    (out / "rl_quality.md").write_text(text)
    (out / "rl_quality.json").write_text(json.dumps({"rows": rows, "train_done": train_done, "rl_done": rl_done},
                                                    indent=2))
    shutil.copy(run / "logs" / "metrics.jsonl", out / "metrics.jsonl")
    print(text)


if __name__ == "__main__":
    main()
