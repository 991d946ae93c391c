"""eval: do the models answer with SQL only, and correctly?

For each model (the base, with the seed's prompt variants; base + adapter; the merged model) it generates
greedy answers for a split in length-sorted batches and scores every answer on
  sql_only             one SQL query and nothing else (jobs.sqlcheck, a parser)
  exact_match          after normalisation (jobs.sqlcheck.normalize_sql)
  execution_accuracy   same rows as the gold query on several generated SQLite databases (jobs.scoring, run in
                       jobs.sandbox's worker processes); examples whose gold query fails to run (gold_error) or
                       whose tables SQLite cannot hold (build_error) are counted apart with their reason, not as misses
plus latency and throughput. Writes eval/report.json, report.md, predictions.jsonl and metrics.png. Each model's
answers are saved (eval.partial/generations/) as soon as they exist, so a rerun after a crash or kill only scores.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path

from sqlglot import exp
from tqdm.auto import tqdm

from jobs import scoring, sqlcheck
from jobs.chat import render_prompt
from jobs.config import Config
from jobs.errors import T2SError
from jobs.generate import Generation, generate_batched
from jobs.models import default_device, load_run_model
from jobs.rundir import RunDir, fresh_staging, read_json, write_atomic
from jobs.sandbox import Sandbox

METRICS = ("sql_only", "exact_match", "execution_accuracy")
NOT_SCORED = ("gold_error", "build_error")  # left out of execution accuracy: the example's fault, not the model's
GENERATIONS = "generations"  # the staging's folder of saved answers, kept when an interrupted eval reruns


# ---------- pure core ----------

def summarize(scored: list[dict]) -> dict:
    """Rates over examples; execution accuracy over the examples whose tables build and whose gold query runs."""
    n = len(scored)
    runnable = [s for s in scored if s["execution"] not in NOT_SCORED]
    outcomes = Counter(s["execution"] for s in scored)  # reading a missing outcome adds no zero to it
    return {
        "n": n,
        "sql_only": sum(s["sql_only"] for s in scored) / n if n else 0.0,
        "exact_match": sum(s["exact_match"] for s in scored) / n if n else 0.0,
        "execution_accuracy": sum(s["execution"] == "match" for s in runnable) / len(runnable) if runnable else 0.0,
        "gold_error": outcomes["gold_error"],
        "build_error": outcomes["build_error"],
        "execution_outcomes": dict(outcomes),
    }


def bucket_names(row: dict) -> list[str]:
    """The report's buckets an example is in: its source, how many tables its gold query reads (3 meaning 3 or
    more), and whether it aggregates, joins or orders."""
    query = sqlcheck.single_query(row["answer"])
    if query is None:
        return [f"source={row.get('source', 'unknown')}", "tables=0"]
    ctes = {cte.alias_or_name.lower() for cte in query.find_all(exp.CTE)}
    tables = len({table.name.lower() for table in query.find_all(exp.Table)} - ctes)
    kinds = {"aggregate": exp.AggFunc, "join": exp.Join, "order": exp.Order}
    return [f"source={row.get('source', 'unknown')}", f"tables={min(tables, 3)}{'+' if tables >= 3 else ''}",
            *[kind for kind, node in kinds.items() if query.find(node) is not None]]


def build_error_reasons(scored: list[dict]) -> dict[str, int]:
    """How many examples' tables SQLite could not hold, by reason."""
    return dict(Counter(s["execution_detail"] for s in scored if s["execution"] == "build_error").most_common())


def buckets(rows: list[dict], scored: list[dict]) -> dict[str, dict]:
    grouped = defaultdict(list)
    for row, s in zip(rows, scored):
        for name in bucket_names(row):
            grouped[name].append(s)
    return {name: summarize(items) for name, items in sorted(grouped.items())}


def render_markdown(report: dict) -> str:
    labels = list(report["results"])
    lines = [f"# t2s eval · run {report['run_id']} · {report['split']} split, {report['n_examples']} examples", "",
             f"Base model: `{report['models']['base']}` · fine-tuned: `{report['models'].get('finetuned')}` · "
             f"dataset `{report['dataset']['source']}` (hash {report['dataset']['hash'][:12]})", "",
             "| model | SQL-only | exact match | execution accuracy | gold fails to run | tables cannot be built "
             "| queries/s | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        r = report["results"][label]
        lines.append(f"| {label} | {r['sql_only']:.1%} | {r['exact_match']:.1%} | {r['execution_accuracy']:.1%} | "
                     f"{r['gold_error']} | {r['build_error']} | {r['queries_per_s']:.1f} | {r['tokens_per_s']:.0f} |")
    if report["build_errors"]:
        lines += ["", "Examples whose tables SQLite cannot hold (left out of execution accuracy): "
                  + "; ".join(f"{reason} ({count})" for reason, count in report["build_errors"].items()) + "."]
    lines += ["", "## By bucket (execution accuracy · SQL-only)", "",
              "| bucket | n | " + " | ".join(labels) + " |", "|---|---:|" + "---:|" * len(labels)]
    for name in report["buckets"][labels[0]]:
        cells = [f"{report['buckets'][label][name]['execution_accuracy']:.0%} · "
                 f"{report['buckets'][label][name]['sql_only']:.0%}" for label in labels]
        lines.append(f"| {name} | {report['buckets'][labels[0]][name]['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Exact match compares sqlglot's re-printing of both queries (whitespace, keyword case, quote style "
              "and a trailing semicolon do not count). Execution accuracy runs gold and prediction on "
              f"{report['config']['databases_per_example']} generated SQLite databases per example, read-only, "
              f"with a {report['config']['query_timeout_s']} s limit per query.", ""]
    return "\n".join(lines + render_endings(report))


def answer_endings(generations) -> dict:
    """How answers ended: the model's own end-of-turn token, or cut at eval.max_new_tokens (a model that never stops
    repeats itself until then, which SQL-only alone does not explain)."""
    n = len(generations)
    eos = sum(bool(g.ended_at_eos) for g in generations)
    return {"ended_at_eos": eos / n if n else 0.0, "hit_token_limit": (n - eos) / n if n else 0.0}


def render_endings(report: dict) -> list[str]:
    """The report's "How answers end" section; none for a report from before answers' endings were recorded."""
    rows = [f"| {label} | {r['ended_at_eos']:.1%} | {r['hit_token_limit']:.1%} |"
            for label, r in report["results"].items() if "ended_at_eos" in r]
    if not rows:
        return []
    limit = report["config"].get("max_new_tokens")
    return ["## How answers end", "", f"| model | end-of-turn token | cut at the token limit ({limit}) |",
            "|---|---:|---:|", *rows, ""]


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, label in enumerate(labels):
        values = [results[label][m] * 100 for m in METRICS]
        bars = ax.bar([x + i * width for x in range(len(METRICS))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(METRICS))],
                  ["SQL-only", "exact match", "execution accuracy"])
    ax.set_ylabel("% of examples")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------- I/O shell ----------

def read_split(run: RunDir, split: str, limit: int | None) -> list[dict]:
    path = run.split(split)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise T2SError(f"the {split} split in {path} is empty: choose eval.split or give prep more data")
    return rows[:limit] if limit else rows


def models_to_evaluate(cfg: Config, run: RunDir) -> list[tuple[str, str, str]]:
    """(label, what to load, prompt variant) for each configured model."""
    plan = []
    for which in cfg.eval.models:
        if which == "base":
            plan += [("base" if v == "plain" else f"base:{v}", "base", v) for v in cfg.eval.prompt_variants]
        elif which == "adapter":
            run.require("train", "eval of the adapter")
            if run.trained() != "adapter":
                raise T2SError(f"eval.models has adapter, but {run.adapter} holds a full fine-tune (no LoRA adapter): "
                               "evaluate it as merged (`t2s merge`, then eval.models: [base, merged])")
            plan.append(("adapter", "adapter", "plain"))
        else:
            run.require("merge", "eval of the merged model")
            plan.append(("merged", "merged", "plain"))
    return plan


def generation_key(cfg: Config, run: RunDir, rows: list[dict], which: str, variant: str) -> dict:
    """What decides a model's answers to the split: saved answers are reused only for the same key."""
    jobs = {"base": ("prep",), "adapter": ("prep", "train"), "merged": ("prep", "train", "merge")}[which]
    questions = json.dumps([[row["context"], row["question"]] for row in rows], ensure_ascii=False)
    key = {"model": cfg.model.model_dump(mode="json"), "which": which, "variant": variant, "split": cfg.eval.split,
           "questions_sha256": hashlib.sha256(questions.encode()).hexdigest(),
           "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size,
           "device": default_device(),
           "finished": {job: read_json(run.marker(job)) for job in jobs}}  # a retrained model is another model
    return json.loads(json.dumps(key))  # as it reads back from the file


def saved_generations(path: Path, key: dict) -> tuple[list[Generation], float] | None:
    """The answers saved at `path` under `key`, and the seconds they took; None when there are none to reuse."""
    try:
        saved = json.loads(path.read_text())
        if saved["key"] != key:
            return None
        return [Generation(**g) for g in saved["generations"]], saved["generation_s"]
    except (OSError, ValueError, KeyError, TypeError):  # none saved, or by another version of t2s: generate again
        return None


def generate_answers(cfg: Config, run: RunDir, rows: list[dict], which: str,
                     variant: str) -> tuple[list[Generation], float]:
    """The model's greedy answers to the split's questions, and the seconds generation took."""
    import torch

    model, tokenizer = load_run_model(cfg, run, which)
    model = model.to(default_device()).eval()
    prompts = [render_prompt(tokenizer, r["context"], r["question"], variant) for r in rows]
    started = time.perf_counter()
    generations = generate_batched(model, tokenizer, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                   progress=True)
    elapsed = time.perf_counter() - started
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return generations, elapsed


def answers_for(cfg: Config, run: RunDir, rows: list[dict], label: str, which: str, variant: str,
                folder: Path) -> tuple[list[Generation], float]:
    """The model's answers: those an interrupted eval saved in `folder` with the same key, else generated now and
    saved there at once, so that a crash or kill while scoring never costs the generation again."""
    path = folder / f"{label.replace(':', '-')}.json"
    key = generation_key(cfg, run, rows, which, variant)
    saved = saved_generations(path, key)
    if saved is not None:
        print(f"  {label}: reusing the {len(saved[0])} answers an interrupted eval saved in {path}; scoring only",
              flush=True)
        return saved
    generations, elapsed = generate_answers(cfg, run, rows, which, variant)
    write_atomic(path, json.dumps({"key": key, "generation_s": elapsed,
                                   "generations": [dataclasses.asdict(g) for g in generations]}, ensure_ascii=False))
    return generations, elapsed


def score_answers(rows: list[dict], responses: list[str], eval_cfg, sandbox: Sandbox) -> list[dict]:
    """Every answer's scores (jobs.scoring.score_answer), computed in the sandbox's workers."""
    score = functools.partial(scoring.score_answer, databases=eval_cfg.databases_per_example,
                              rows_per_table=eval_cfg.rows_per_table, timeout_s=eval_cfg.query_timeout_s,
                              row_limit=eval_cfg.row_limit)
    tasks = [(row["context"], row["answer"], response, seed)
             for seed, (row, response) in enumerate(zip(rows, responses))]
    return list(tqdm(sandbox.map(score, tasks, if_killed=scoring.score_after_kill), total=len(tasks), desc="scoring",
                     mininterval=2))


def evaluate_model(generations: list[Generation], elapsed: float, rows: list[dict], cfg: Config,
                   sandbox: Sandbox) -> tuple[list[dict], dict]:
    scored = score_answers(rows, [g.text for g in generations], cfg.eval, sandbox)
    for s, g in zip(scored, generations):
        s.update(response=g.text, new_tokens=g.new_tokens, latency_ms=g.latency_s * 1000, ended_at_eos=g.ended_at_eos)
    speed = {
        "queries_per_s": len(rows) / elapsed,
        "tokens_per_s": sum(g.new_tokens for g in generations) / elapsed,
        "latency_ms_mean": sum(g.latency_s for g in generations) / len(generations) * 1000,
        "generation_s": elapsed,
    }
    return scored, {**speed, **answer_endings(generations)}


def scoring_workers() -> int:
    """Sandbox workers for scoring: one per CPU core this process may use, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


def check(cfg: Config, run: RunDir) -> None:
    run.require("prep", "eval")
    read_split(run, cfg.eval.split, cfg.eval.max_examples)
    models_to_evaluate(cfg, run)


def run(cfg: Config, run: RunDir) -> str:
    import torch

    rows = read_split(run, cfg.eval.split, cfg.eval.max_examples)
    plan = models_to_evaluate(cfg, run)
    manifest = json.loads(run.manifest.read_text())
    staging = fresh_staging(run.eval, keep=(GENERATIONS,))
    (staging / GENERATIONS).mkdir(exist_ok=True)
    results, by_bucket, predictions = {}, {}, defaultdict(dict)
    with Sandbox(workers=scoring_workers()) as sandbox:
        for label, which, variant in plan:
            print(f"evaluating {label} on {len(rows)} {cfg.eval.split} examples", flush=True)
            generations, elapsed = answers_for(cfg, run, rows, label, which, variant, staging / GENERATIONS)
            scored, speed = evaluate_model(generations, elapsed, rows, cfg, sandbox)
            results[label] = {**summarize(scored), **speed}
            by_bucket[label] = buckets(rows, scored)
            for i, s in enumerate(scored):
                predictions[i][label] = s
            r = results[label]
            print(f"  {label}: SQL-only {r['sql_only']:.1%} · exact {r['exact_match']:.1%} · "
                  f"execution {r['execution_accuracy']:.1%} · ended at EOS {r['ended_at_eos']:.1%} · "
                  f"{r['queries_per_s']:.1f} queries/s", flush=True)

    report = {
        "run_id": cfg.run_id,
        "split": cfg.eval.split,
        "n_examples": len(rows),
        "dataset": {"source": manifest["source"], "hash": manifest["content_hash"], "splits": manifest["rows"]},
        "models": {"base": cfg.model.name_or_path,
                   "finetuned": str(run.merged if "merged" in results else run.adapter)},
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "results": results,
        "buckets": by_bucket,
        "build_errors": build_error_reasons(scored),  # the same for every model: they depend on the example only
        "config": cfg.eval.model_dump(mode="json"),
    }
    with open(staging / "predictions.jsonl", "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, "predictions": predictions[i]}, ensure_ascii=False) + "\n")
    write_atomic(staging / run.report.name, json.dumps(report, indent=2) + "\n")
    write_atomic(staging / run.report_md.name, render_markdown(report))
    plot(results, staging / "metrics.png", f"run {cfg.run_id}: {cfg.eval.split} split, {len(rows)} examples")
    run.finish("eval", cfg, [(staging, run.eval)],
               results={k: {m: v[m] for m in METRICS} for k, v in results.items()})
    best = max(results, key=lambda k: results[k]["execution_accuracy"])
    return f"{len(results)} model(s) scored; best execution accuracy {results[best]['execution_accuracy']:.1%} " \
           f"({best}); report {run.report_md}"
