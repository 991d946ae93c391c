"""eval: do the models answer with SQL only, and correctly?

For each model (the base, with the seed's prompt variants; base + adapter; the merged model) it generates
greedy answers for a split in length-sorted batches and scores every answer on
  sql_only             one SQL query and nothing else (jobs.lib.sqlcheck, a parser)
  exact_match          after normalisation (jobs.lib.sqlcheck.normalize_sql)
  execution_accuracy   same rows as the gold query on several generated SQLite databases (jobs.lib.scoring, run in
                       jobs.lib.sandbox's worker processes); examples whose gold query fails to run (gold_error) or
                       whose tables SQLite cannot hold (build_error) are counted apart with their reason, not as misses
  fails_to_execute     the share of predictions that do not run at all (not SQL, an SQLite error, refused, timed out)
plus latency and throughput. With eval.decoding: checked, each fine-tuned model is also scored with checked decoding
(jobs.lib.checked), as its own row "<model>+checked" beside the greedy one, in every table and bucket; its queries/s
count the greedy answers it starts from, the checks and the beam search. Writes eval/report.json, report.md,
predictions.jsonl and metrics.png. Each model's answers are saved (eval.partial/generations/) as soon as they exist,
so a rerun after a crash or kill only scores.
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

from jobs import curves
from jobs.lib import candidates, checked, scoring, sqlcheck, vote
from jobs.lib.chat import render_prompt
from jobs.lib.config import Config
from jobs.lib.errors import T2SError
from jobs.lib.generate import Generation, decoding_info, generate_batched
from jobs.lib.models import default_device, load_run_model
from jobs.lib.report import CHECKED, METRICS, compile_note, plot, render_markdown, subset
from jobs.lib.rundir import RunDir, fresh_staging, read_json, write_atomic
from jobs.lib.sandbox import Sandbox

NOT_SCORED = ("gold_error", "build_error")  # left out of execution accuracy: the example's fault, not the model's
FAILS_TO_EXECUTE = ("not_sql", "pred_error", "pred_timeout", "pred_refused")  # the prediction does not run at all
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
        "fails_to_execute": (sum(s["execution"] in FAILS_TO_EXECUTE for s in runnable) / len(runnable)
                             if runnable else 0.0),
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


def answer_endings(generations) -> dict:
    """How answers ended: the model's own end-of-turn token, or cut at eval.max_new_tokens (a model that never stops
    repeats itself until then, which SQL-only alone does not explain)."""
    n = len(generations)
    eos = sum(bool(g.ended_at_eos) for g in generations)
    return {"ended_at_eos": eos / n if n else 0.0, "hit_token_limit": (n - eos) / n if n else 0.0}


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
        elif which.startswith("gguf:"):  # an exported GGUF file, through llama.cpp (jobs.export)
            from jobs.export import exported_file

            exported_file(run, which.removeprefix("gguf:"))
            plan.append((which, which, "plain"))
        else:
            run.require("merge", "eval of the merged model")
            plan.append(("merged", "merged", "plain"))
    return plan


def device_name() -> str:
    """The device answers are generated on, by model: "NVIDIA L4", not "cuda". Saved answers are reused only on the
    same one, so an eval resumed on another GPU type never reports the first GPU's throughput under the second's
    name (in bf16, its near-ties may also fall the other way)."""
    import torch

    return torch.cuda.get_device_name(0) if default_device() == "cuda" else default_device()


def generation_key(cfg: Config, run: RunDir, rows: list[dict], which: str, variant: str) -> dict:
    """What decides a model's answers to the split: saved answers are reused only for the same key."""
    jobs = {"base": ("prep",), "adapter": ("prep", "train", "rl"), "merged": ("prep", "train", "rl", "merge")}.get(
        which, ("prep", "train", "rl", "merge", "export"))  # gguf:<quant>
    questions = json.dumps([[row["context"], row["question"]] for row in rows], ensure_ascii=False)
    key = {"model": cfg.model.model_dump(mode="json"), "which": which, "variant": variant, "split": cfg.eval.split,
           "questions_sha256": hashlib.sha256(questions.encode()).hexdigest(),
           "max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.batch_size, "device": device_name(),
           "decoder": cfg.eval.decoder,  # in bf16 another decoder may flip a near-tie (README: fast decoding)
           "finished": {job: read_json(run.marker(job)) for job in jobs}}  # a retrained model is another model
    return json.loads(json.dumps(key))  # as it reads back from the file


def saved_generations(path: Path, key: dict) -> tuple[list[Generation], float, dict] | None:
    """The answers saved at `path` under `key`, the seconds they took and how they were decoded
    (jobs.lib.generate.decoding_info); None when there are none to reuse."""
    try:
        saved = json.loads(path.read_text())
        if saved["key"] != key:
            return None
        return [Generation(**g) for g in saved["generations"]], saved["generation_s"], saved.get("decoding", {})
    except (OSError, ValueError, KeyError, TypeError):  # none saved, or by another version of t2s: generate again
        return None


def generate_answers(cfg: Config, run: RunDir, rows: list[dict], which: str,
                     variant: str) -> tuple[list[Generation], float, dict]:
    """The model's greedy answers to the split's questions, the seconds generation took (CUDA graph captures
    included) and how they were decoded (jobs.lib.generate.decoding_info: backend, compile_s, fallback)."""
    import torch

    if which.startswith("gguf:"):
        from jobs.export import gguf_generations

        return gguf_generations(cfg, run, rows, which)
    model, tokenizer = load_run_model(cfg, run, which)
    model = model.to(default_device()).eval()
    prompts = [render_prompt(tokenizer, r["context"], r["question"], variant) for r in rows]
    started = time.perf_counter()
    generations = generate_batched(model, tokenizer, prompts, cfg.eval.batch_size, cfg.eval.max_new_tokens,
                                   progress=True, decoder=cfg.eval.decoder)
    elapsed = time.perf_counter() - started
    decoding = decoding_info(model)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return generations, elapsed, decoding


def answers_for(cfg: Config, run: RunDir, rows: list[dict], label: str, which: str, variant: str,
                folder: Path) -> tuple[list[Generation], float, dict]:
    """The model's answers: those an interrupted eval saved in `folder` with the same key, else generated now and
    saved there at once, so that a crash or kill while scoring never costs the generation again."""
    path = folder / f"{label.replace(':', '-')}.json"
    key = generation_key(cfg, run, rows, which, variant)
    saved = saved_generations(path, key)
    if saved is not None:
        print(f"  {label}: reusing the {len(saved[0])} answers an interrupted eval saved in {path}; scoring only",
              flush=True)
        return saved
    generations, elapsed, decoding = generate_answers(cfg, run, rows, which, variant)
    write_atomic(path, json.dumps({"key": key, "generation_s": elapsed, "decoding": decoding,
                                   "generations": [dataclasses.asdict(g) for g in generations]}, ensure_ascii=False))
    return generations, elapsed, decoding


def checked_answers_for(cfg: Config, run: RunDir, rows: list[dict], label: str, which: str, variant: str,
                        folder: Path, greedy: list[Generation], greedy_s: float,
                        sandbox: Sandbox) -> tuple[list[Generation], float, list[dict]]:
    """Checked decoding's answers (jobs.lib.checked), starting from the model's greedy ones: as Generations to score,
    the seconds they took in all (greedy_s, the checks and the search; loading the model for the search left out, as
    greedy's load is), and what the checks said of each. Saved in `folder` as answers_for saves, reused the same way."""
    path = folder / f"{label.replace(':', '-')}{CHECKED}.json"
    key = {**generation_key(cfg, run, rows, which, variant), "decoding": "checked",
           "candidates": cfg.eval.candidates, "greedy_s": greedy_s,
           "checks": [checked.CHECK_ROWS_PER_TABLE, cfg.eval.query_timeout_s, cfg.eval.row_limit]}
    key = json.loads(json.dumps(key))
    saved = saved_generations(path, key)
    if saved is not None:
        print(f"  {label}{CHECKED}: reusing the {len(saved[0])} answers an interrupted eval saved in {path}; "
              "scoring only", flush=True)
        generations, seconds, _ = saved
        return generations, seconds, json.loads(path.read_text())["checks"]

    loaded, load_s = [], 0.0

    def search(indices: list[int]) -> list[list]:
        nonlocal load_s
        if not loaded:  # only when some greedy answer failed its checks
            clock = time.perf_counter()
            model, tokenizer = load_run_model(cfg, run, which)
            loaded.extend((model.to(default_device()).eval(), tokenizer))
            load_s = time.perf_counter() - clock
        model, tokenizer = loaded
        prompts = [render_prompt(tokenizer, rows[i]["context"], rows[i]["question"], variant) for i in indices]
        return candidates.search_with_model(model, tokenizer, prompts, [greedy[i] for i in indices],
                                            cfg.eval.candidates, cfg.eval.batch_size, cfg.eval.max_new_tokens)

    started = time.perf_counter()
    choices = checked.choose_answers([row["context"] for row in rows], greedy, search, sandbox,
                                     candidates=cfg.eval.candidates, timeout_s=cfg.eval.query_timeout_s,
                                     row_limit=cfg.eval.row_limit)
    extra_s = time.perf_counter() - started - load_s
    loaded.clear()
    free_gpu_memory()
    generations = [Generation(c.text, c.candidate.new_tokens, g.latency_s + extra_s, c.candidate.ended == "eos")
                   for c, g in zip(choices, greedy)]
    checks = [{"checked": c.checked, "candidates_tried": len(c.tried), "greedy_failed_checks": not c.tried[0][1].passed,
               "why_unchecked": c.why_unchecked} for c in choices]
    write_atomic(path, json.dumps({"key": key, "generation_s": greedy_s + extra_s, "checks": checks,
                                   "generations": [dataclasses.asdict(g) for g in generations]}, ensure_ascii=False))
    return generations, greedy_s + extra_s, checks


def free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_summary(checks: list[dict]) -> dict:
    """What the checks did for a model's checked answers: shares of questions."""
    n = len(checks) or 1
    return {"passed_checks": sum(c["checked"] for c in checks) / n,
            "searched": sum(c["greedy_failed_checks"] for c in checks) / n}


def score_answers(rows: list[dict], responses: list[str], eval_cfg, sandbox: Sandbox) -> list[dict]:
    """Every answer's scores (jobs.lib.scoring.score_answer), computed in the sandbox's workers."""
    score = functools.partial(scoring.score_answer, databases=eval_cfg.databases_per_example,
                              rows_per_table=eval_cfg.rows_per_table, timeout_s=eval_cfg.query_timeout_s,
                              row_limit=eval_cfg.row_limit)
    tasks = [(row["context"], row["answer"], response, seed)
             for seed, (row, response) in enumerate(zip(rows, responses))]
    return list(tqdm(sandbox.map(score, tasks, if_killed=scoring.score_after_kill), total=len(tasks), desc="scoring",
                     mininterval=2))


def decoding_speed(generations: list[Generation], elapsed: float, decoding: dict) -> dict:
    """Throughput over the decoding time, which leaves out the one-time CUDA graph captures (compile_s, reported
    apart: paid once per shape bucket per process); generation_s is the whole wall time."""
    compile_s = decoding.get("compile_s", 0.0)
    decoding_s = max(elapsed - compile_s, 1e-9)
    return {
        "queries_per_s": len(generations) / decoding_s,
        "tokens_per_s": sum(g.new_tokens for g in generations) / decoding_s,
        "latency_ms_mean": sum(g.latency_s for g in generations) / len(generations) * 1000,
        "generation_s": elapsed,
        "compile_s": compile_s,
        "decoder": decoding.get("backend", "dynamic"),
        **({"decoder_fallback": decoding["fallback"]} if decoding.get("fallback") else {}),
    }


def evaluate_model(generations: list[Generation], elapsed: float, decoding: dict, rows: list[dict], cfg: Config,
                   sandbox: Sandbox) -> tuple[list[dict], dict]:
    scored = score_answers(rows, [g.text for g in generations], cfg.eval, sandbox)
    for s, g in zip(scored, generations):
        s.update(response=g.text, new_tokens=g.new_tokens, latency_ms=g.latency_s * 1000, ended_at_eos=g.ended_at_eos)
    speed = decoding_speed(generations, elapsed, decoding)
    return scored, {**speed, **answer_endings(generations)}


def scoring_workers() -> int:
    """Sandbox workers for scoring and checked decoding's checks: one per CPU core this process may use, at most 8
    (a GPU machine's cores otherwise idle while checks hold up the next generation step)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def check(cfg: Config, run: RunDir) -> None:
    run.require("prep", "eval")
    read_split(run, cfg.eval.split, cfg.eval.max_examples)
    models_to_evaluate(cfg, run)


def run(cfg: Config, run: RunDir) -> str:
    rows = read_split(run, cfg.eval.split, cfg.eval.max_examples)
    plan = models_to_evaluate(cfg, run)
    manifest = json.loads(run.manifest.read_text())
    staging = fresh_staging(run.eval, keep=(GENERATIONS,))
    (staging / GENERATIONS).mkdir(exist_ok=True)
    results, by_bucket, predictions, build_errors = {}, {}, defaultdict(dict), {}
    with Sandbox(workers=scoring_workers()) as sandbox:
        for label, which, variant in plan:
            print(f"evaluating {label} on {subset(len(rows), manifest, cfg.eval.split)}", flush=True)
            generations, elapsed, decoding = answers_for(cfg, run, rows, label, which, variant, staging / GENERATIONS)
            decodings = [(label, generations, elapsed, decoding, None)]
            greedy_only = which == "base" or which.startswith("gguf:")  # (the searches need transformers' model)
            if cfg.eval.decoding in ("checked", "vote") and not greedy_only:  # vote: beside checked
                checked_generations, checked_s, checks = checked_answers_for(
                    cfg, run, rows, label, which, variant, staging / GENERATIONS, generations, elapsed, sandbox)
                searched = {**decoding, "backend": f"{decoding.get('backend', 'dynamic')}, then beam search"}
                decodings.append((label + CHECKED, checked_generations, checked_s, searched, checks))
            if cfg.eval.decoding == "vote" and not greedy_only:  # jobs.lib.vote: answers chosen by their results
                voted, voted_s, votes = vote.eval_vote_answers(
                    cfg, run, rows, label, which, variant, staging / GENERATIONS, generations, elapsed, sandbox,
                    generation_key(cfg, run, rows, which, variant))
                sampled = {**decoding, "backend": f"{decoding.get('backend', 'dynamic')}, then sampling"}
                decodings.append((label + vote.VOTE, voted, voted_s, sampled, votes))
            for name, answers, seconds, decoder, checks in decodings:
                scored, speed = evaluate_model(answers, seconds, decoder, rows, cfg, sandbox)
                mode = ({"decoding": "greedy"} if checks is None else
                        {"decoding": "vote", "samples": cfg.eval.vote_samples, **vote.vote_summary(checks)}
                        if name.endswith(vote.VOTE) else
                        {"decoding": "checked", "candidates": cfg.eval.candidates, **check_summary(checks)})
                for s, check in zip(scored, checks or [{}] * len(scored)):
                    s.update(check)
                results[name] = {**summarize(scored), **speed, **mode}
                by_bucket[name] = buckets(rows, scored)
                build_errors = build_error_reasons(scored)  # the same for every model: they depend on the example only
                for i, s in enumerate(scored):
                    predictions[i][name] = s
                r = results[name]
                print(f"  {name}: SQL-only {r['sql_only']:.1%} · exact {r['exact_match']:.1%} · "
                      f"execution {r['execution_accuracy']:.1%} · fails to execute {r['fails_to_execute']:.1%} · "
                      f"ended at EOS {r['ended_at_eos']:.1%} · {r['queries_per_s']:.1f} queries/s "
                      f"({r['decoder']} decoder{compile_note(r)})", flush=True)

    report = {
        "run_id": cfg.run_id,
        "split": cfg.eval.split,
        "n_examples": len(rows),
        "split_rows": (manifest.get("rows") or {}).get(cfg.eval.split),  # n_examples is fewer with eval.max_examples
        "dataset": {"source": manifest["source"], "hash": manifest["content_hash"], "splits": manifest["rows"]},
        "models": {"base": cfg.model.name_or_path,
                   "finetuned": str(run.merged if "merged" in results else run.adapter)},
        "device": device_name(),  # where every answer was generated and timed (generation_key)
        "results": results,
        "buckets": by_bucket,
        "build_errors": build_errors,
        "config": cfg.eval.model_dump(mode="json"),
        # train and validation loss, learning rate per step (jobs.curves), when train logged them
        "training_curves": curves.FILE_NAME if curves.plot_training_curves(
            run.metrics, staging / curves.FILE_NAME, f"run {cfg.run_id}: training") else None,
    }
    with open(staging / "predictions.jsonl", "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({**row, "predictions": predictions[i]}, ensure_ascii=False) + "\n")
    write_atomic(staging / run.report.name, json.dumps(report, indent=2) + "\n")
    write_atomic(staging / run.report_md.name, render_markdown(report))
    plot(results, staging / "metrics.png", f"run {cfg.run_id}: {subset(len(rows), manifest, cfg.eval.split)}")
    run.finish("eval", cfg, [(staging, run.eval)],
               results={k: {m: v[m] for m in METRICS} for k, v in results.items()})
    best = max(results, key=lambda k: results[k]["execution_accuracy"])
    return f"{len(results)} model(s) scored; best execution accuracy {results[best]['execution_accuracy']:.1%} " \
           f"({best}); report {run.report_md}"
