"""The model card pushed with a model: README.md for the Hub, rendered from the run's own files.

Every number comes from the run (eval/report.json, train.done: what train really ran with, the config); what is
missing says so. The scores go into the card's metadata too (model-index), which the Hub shows beside the model. The
usage example shows the exact prompt the model was trained on (jobs.lib.chat.render_prompt), rendered from the
artifact's chat template without loading a tokenizer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from jobs.lib.config import Config
from jobs.lib.hub import is_hub_id
from jobs.lib.rundir import read_json

CHECKED = "+checked"  # the label suffix of a checked-decoding row in eval's report (jobs.eval.CHECKED)

EXAMPLE = {"context": "CREATE TABLE head (age INTEGER)",
           "question": "How many heads of the departments are older than 56 ?"}
_SENTINEL = "T2S_ANSWER_SENTINEL"


def read_chat_template(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The artifact's chat template (chat_template.jinja or tokenizer_config.json) and its special tokens."""
    config = read_json(folder / "tokenizer_config.json") or {}
    tokens = {**(read_json(folder / "special_tokens_map.json") or {}), **config}
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tokens.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[name] = value
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    return (template if isinstance(template, str) and template else None), special


def trained_prompt_suffix(chat_template: str, special_tokens: dict[str, str]) -> str | None:
    """What must follow the `add_generation_prompt=True` prompt to give the text that preceded the SQL in
    training (jobs.lib.chat.render_prompt): "" for TinyLlama's template as transformers renders it, "\\n" for one
    whose generation prompt stops at "<|assistant|>"; None when the template cannot be rendered here or its
    generation prompt is no prefix of the training text. Rendered as transformers does (sandboxed jinja,
    trim_blocks, lstrip_blocks), so that pushing needs no tokenizer library."""
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals.update(raise_exception=raise_exception, strftime_now=time.strftime)
        template = env.from_string(chat_template)
        messages = [{"role": "system", "content": EXAMPLE["context"]}, {"role": "user", "content": EXAMPLE["question"]}]
        generation = template.render(messages=messages, add_generation_prompt=True, **special_tokens)
        training = template.render(messages=messages + [{"role": "assistant", "content": _SENTINEL}],
                                   add_generation_prompt=False, **special_tokens)
    except Exception:  # an unusual template is no reason to fail a push: the card then shows the safe recipe
        return None
    prefix, found, _ = training.partition(_SENTINEL)
    if not found or not prefix.startswith(generation):
        return None
    return prefix[len(generation):]


def render_model_card(cfg: Config, repo_id: str, *, report: dict | None, train_done: dict | None,
                      prompt_suffix: str | None, run_span_s: float | None = None,
                      training_curves: bool = False, rl_done: dict | None = None,
                      export_done: dict | None = None) -> str:
    """README.md for the Hub: metadata, what the model does, usage, eval, training, hardware, time and cost.
    Every number comes from the run (eval/report.json, train.done, the config); what is missing says so."""
    from huggingface_hub import ModelCardData

    base = cfg.model.name_or_path
    dataset = (report or {}).get("dataset", {}).get("source") or cfg.data.source
    adapter = cfg.push.artifact == "adapter"
    tags = ["text-to-sql", "sql", "t2s"] + (["peft"] if adapter else []) + (
        [cfg.train.method] if cfg.train.method in ("lora", "qlora") else [])
    scores = eval_results(report, cfg.push.artifact, dataset)
    metadata = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        datasets=[dataset] if is_hub_id(dataset) else None,
        license=cfg.push.license,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=repo_id.split("/")[-1] if scores else None,
        eval_results=scores or None,
    )
    base_md = f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`"
    dataset_md = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if is_hub_id(dataset) else f"`{dataset}`"
    what = ("a LoRA adapter for " + base_md + " (load it on top of the base model with peft)" if adapter
            else "a fine-tune of " + base_md + (" (the LoRA adapter merged into the base weights; plain transformers "
                                                 "loads it)" if cfg.train.method != "full" else ""))
    sections = [
        f"# {repo_id.split('/')[-1]}",
        f"Text-to-SQL: given the `CREATE TABLE` statements of a database and a question, the model answers with one "
        f"SQL query and nothing else. This repo holds {what}, trained by t2s on {dataset_md}.",
        _usage_section(repo_id, adapter, prompt_suffix, cfg.eval.max_new_tokens),
        *([_gguf_section(repo_id, export_done, cfg.eval.max_new_tokens)] if export_done else []),
        _eval_section(report, cfg.push.artifact, base),
        _training_section(cfg, train_done, dataset_md, training_curves),
        *([_rl_section(rl_done)] if rl_done else []),
        _cost_section(cfg, train_done, run_span_s),
        _files_section(adapter, report is not None),
    ]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


METRIC_NAMES = {"sql_only": "SQL-only", "exact_match": "Exact match", "execution_accuracy": "Execution accuracy"}


def eval_results(report: dict | None, artifact: str, dataset: str) -> list:
    """The published model's scores as the Hub's model-index (EvalResult), from its row of the eval report (merged and
    adapter are the same model: merge checks that their logits agree)."""
    from huggingface_hub import EvalResult

    results = (report or {}).get("results") or {}
    row = next((results[name] for name in (artifact, "merged", "adapter") if isinstance(results.get(name), dict)), {})
    split = (report or {}).get("split")
    return [EvalResult(task_type="text-generation", task_name="Text-to-SQL", dataset_type=dataset,
                       dataset_name=f"{dataset} ({split} split)", dataset_split=split, metric_type=metric,
                       metric_name=name, metric_value=round(float(row[metric]), 4))
            for metric, name in METRIC_NAMES.items() if _is_number(row.get(metric)) and isinstance(split, str)]


def _usage_section(repo_id: str, adapter: bool, suffix: str | None, max_new_tokens: int) -> str:
    if adapter:
        load = ("from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f'repo = "{repo_id}"\ntokenizer = AutoTokenizer.from_pretrained(repo)\n'
                'model = AutoPeftModelForCausalLM.from_pretrained(repo, torch_dtype="auto")')
    else:
        load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f'repo = "{repo_id}"\ntokenizer = AutoTokenizer.from_pretrained(repo)\n'
                'model = AutoModelForCausalLM.from_pretrained(repo, torch_dtype="auto")')
    messages = (f"schema = {json.dumps(EXAMPLE['context'])}\nquestion = {json.dumps(EXAMPLE['question'])}\n"
                'messages = [{"role": "system", "content": schema}, {"role": "user", "content": question}]')
    if suffix is None:
        prompt = (
            "# The prompt must be exactly the text that preceded the SQL in training: render the whole\n"
            "# conversation and cut it where the answer starts.\n"
            'answer = {"role": "assistant", "content": "@@SQL@@"}\n'
            "text = tokenizer.apply_chat_template(messages + [answer], tokenize=False)\n"
            'prompt = text[: text.index("@@SQL@@")]')
        note = ("The prompt is cut from the rendered training text rather than built with "
                "`add_generation_prompt=True`, which t2s could not check for this chat template.")
    else:
        prompt = "prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)"
        if suffix:
            prompt += f"\nprompt += {json.dumps(suffix)}  # the training text had this before the SQL"
            note = (f"The trained prompt prefix: training put the SQL right after the rendered assistant header, which "
                    f"is the `add_generation_prompt=True` prompt followed by `{json.dumps(suffix)}`. Leaving it out "
                    "silently costs accuracy.")
        else:
            note = ("The trained prompt prefix: `add_generation_prompt=True` renders exactly the text that preceded "
                    "the SQL in training.")
    generate = ('inputs = tokenizer(prompt, return_tensors="pt").to(model.device)\n'
                f"output = model.generate(**inputs, max_new_tokens={max_new_tokens}, do_sample=False)  # greedy\n"
                'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())')
    return ("## Usage\n\nThe system message is the schema (`CREATE TABLE ...`), the user message the question; "
            f"decoding is greedy.\n\n```python\n{load}\n\n{messages}\n{prompt}\n{generate}\n```\n\n{note}")


def _gguf_section(repo_id: str, done: dict, max_new_tokens: int) -> str:
    """How to run the GGUF files `t2s export` made (pushed under gguf/ with push.artifacts: [gguf])."""
    files = done.get("files", {})
    sizes = done.get("sizes", {})
    listed = ", ".join(f"`{f}` ({sizes.get(q, 0) / 2**20:.0f} MiB)" for q, f in files.items())
    checks = "; ".join(f"{q}: {c.get('summary', '')}" for q, c in (done.get("checks") or {}).items())
    smallest = files.get("q4_k_m") or files.get("q8_0") or files.get("f16") or "MODEL.gguf"
    name = repo_id.split("/")[-1].lower()
    space = (" The prompt starts with a space: the tokenizer's own space before the first word, which llama.cpp "
             "adds only this way.") if done.get("leading_space") else ""
    return (f"## GGUF: llama.cpp, Ollama, LM Studio\n\n`gguf/` holds {listed}, made by `t2s export` with llama.cpp's "
            f"converter and quantizer (llama-cpp-python {done.get('llama_cpp_python', '?')}) and checked against "
            f"this model before upload ({checks}). `gguf/Modelfile` carries the chat template and the stop tokens."
            f"\n\n```bash\nhuggingface-cli download {repo_id} --include 'gguf/*' --local-dir {name}\n"
            f"cd {name}/gguf && ollama create {name} -f Modelfile\n"
            f"ollama run {name}   # /set system CREATE TABLE ...; then ask the question\n"
            f"# llama.cpp: prompt.txt is the Modelfile's TEMPLATE with the schema and the question filled in\n"
            f"llama-cli -m {smallest} -no-cnv --temp 0 --top-k 1 -n {max_new_tokens} -f prompt.txt\n```\n\n"
            f"The system message is the `CREATE TABLE` statements, the prompt the question; llama.cpp adds the BOS "
            f"token itself.{space}")


def _eval_section(report: dict | None, artifact: str, base: str) -> str:
    if report is None:
        return ("## Evaluation\n\nNot evaluated: this run had no finished eval (`t2s eval`) when it was pushed, so "
                "no accuracy is claimed here.")
    results = report.get("results") or {}
    split = report.get("split", "not recorded")
    lines = ["## Evaluation", ""]
    dataset = report.get("dataset") or {}
    n, total = report.get("n_examples"), report.get("split_rows")
    examples = (f"the first {_count(n)} of its {_count(total)} examples, eval.max_examples" if isinstance(n, int)
                and isinstance(total, int) and n < total else f"{_count(n)} examples")
    held_out = "held-out " if split in ("validation", "test") else ""  # never the train split, nor one not recorded
    lines.append(f"On the {held_out}**{split}** split ({examples}) of "
                 f"`{dataset.get('source', 'not recorded')}` as this run prepared it (content hash "
                 f"`{dataset.get('hash', 'not recorded')}`):")
    if split == "train":
        lines += ["", "**These are the rows the model was trained on, not held-out ones: the numbers overstate what it "
                  "does on new questions.**"]
    lines += ["", "| model | SQL-only | exact match | execution accuracy | examples | gold SQL errors | decoding |",
              "|---|---|---|---|---|---|---|"]
    for label, scores in results.items():
        # the same model twice (greedy, checked): each row says which decoding it is
        name = (_model_label(label, base) + (", checked decoding" if label.endswith(CHECKED) else "")
                + (" — **this repo**" if label.removesuffix(CHECKED) == artifact else ""))
        lines.append(f"| {name} | {_percent(scores.get('sql_only'))} | {_percent(scores.get('exact_match'))} | "
                     f"{_percent(scores.get('execution_accuracy'))} | {_count(scores.get('n'))} | "
                     f"{_count(scores.get('gold_error'))} | {_decoding(scores)} |")
    if not results:
        lines.append("| (no results in the report) | not measured | not measured | not measured | | | |")
    checked_rows = any(scores.get("decoding") == "checked" for scores in results.values())
    lines += ["", "Decoding: each row says how its answers were decoded. Greedy: the model's most likely token at each "
              "step, as the usage example above does." + (
                  " Checked (t2s's checked decoding, `t2s ask --decoding checked`): the first of up to N candidate "
                  "answers — the greedy one, then a beam search's, best-scored first — that parses, whose tables and "
                  "columns resolve against the schema and that runs on databases built from it; when none does, the "
                  "best-scored one." if checked_rows else "") +
              " SQL-only: one SQL query and nothing else (checked with a SQL parser). Exact match: "
              "the reference query, up to whitespace, keyword case, quoting and a trailing semicolon. Execution "
              "accuracy: the same rows as the reference query on generated SQLite databases, over the examples whose "
              "reference query runs (the others are the gold SQL errors). Per-bucket scores and every prediction: "
              "`eval/report.md`, `eval/report.json`, `eval/predictions.jsonl`."]
    lines += ["", "| model | queries/s | tokens/s | mean latency | decoding |", "|---|---|---|---|---|"]
    for label, scores in results.items():
        latency = scores.get("latency_ms_mean")
        shown = _model_label(label, base) + (", checked decoding" if label.endswith(CHECKED) else "")
        lines.append(f"| {shown} | {_number(scores.get('queries_per_s'))} | "
                     f"{_number(scores.get('tokens_per_s'))} | "
                     f"{f'{latency:,.1f} ms' if _is_number(latency) else 'not measured'} | {_decoding(scores)} |")
    splits = dataset.get("splits") or {}
    lines += ["", "Dataset splits:", "", "| split | rows |", "|---|---|"]
    lines += [f"| {name} | {_count(splits.get(name))} |" for name in ("train", "validation", "test")]
    return "\n".join(lines)


def _training_section(cfg: Config, train_done: dict | None, dataset_md: str, training_curves: bool = False) -> str:
    t = cfg.train
    done = train_done or {}
    method = {"lora": "LoRA", "qlora": "QLoRA (4-bit base)", "full": "full fine-tune"}[t.method]
    if t.method in ("lora", "qlora"):
        targets = t.lora.target_modules if isinstance(t.lora.target_modules, str) else ", ".join(t.lora.target_modules)
        method += f": r={t.lora.r}, alpha={t.lora.alpha}, dropout={t.lora.dropout}, target modules {targets}"
    processes = done.get("num_processes", done.get("num_gpus"))
    batch = f"{t.per_device_batch_size} per device × {t.gradient_accumulation_steps} accumulation"
    if isinstance(processes, int) and processes > 0:
        per_step = t.per_device_batch_size * t.gradient_accumulation_steps * processes
        batch += f" × {processes} processes = {per_step} per step"
    rows = [
        ("method", method),
        ("base model", f"`{cfg.model.name_or_path}`"),
        ("data", dataset_md),
        ("epochs", f"{t.epochs:g}" if t.max_steps <= 0 else f"max_steps {t.max_steps}"),
        ("learning rate", f"{t.learning_rate:g}, {t.lr_scheduler} schedule, warmup ratio {t.warmup_ratio:g}"),
        ("batch", batch),
        ("packing / max length", f"{t.packing}; examples up to {cfg.data.max_length} tokens (prep dropped longer "
                                 f"ones), sequences up to {t.max_seq_length} tokens"),
        ("loss", "completion only (prompt tokens masked)" if t.completion_only_loss else "whole text"),
        ("precision", _precision(cfg, done)),
        ("optimizer steps", _count(done.get("global_step"))),
        ("examples seen", _count(done.get("examples_seen"))),
        ("final training loss", _number(done.get("train_loss"))),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    source = ("Settings and progress as train recorded them (`run/train.done`)." if done.get("settings") else
              "Settings from the run's config (`run/config.resolved.yaml`); progress from `run/train.done`.")
    curves = ("\n\nLoss and learning rate per step (`eval/training_curves.png`, from `logs/metrics.jsonl`):\n\n"
              "![training and validation loss, learning rate](eval/training_curves.png)" if training_curves else "")
    return f"## Training\n\n{source}\n\n| | |\n|---|---|\n{table}{curves}"


def _rl_section(done: dict) -> str:
    """What `t2s rl` did after training (run/rl.done): GRPO with execution rewards, its settings and its rewards."""
    rl = (done.get("settings") or {}).get("rl") or {}
    weights = rl.get("reward_weights") or {}
    rows = [
        ("method", "GRPO (trl's GRPOTrainer) from the fine-tuned model, rewarded by executing its answers"),
        ("reward weights", ", ".join(f"{k} {v:g}" for k, v in weights.items() if _is_number(v)) or "not recorded"),
        ("steps", f"{_count(done.get('global_step'))} × {_count(rl.get('prompts_per_step'))} prompts × "
                  f"{_count(rl.get('group_size'))} completions"),
        ("learning rate / KL coefficient", f"{_number(rl.get('learning_rate'))} / {_number(rl.get('beta'))}"),
        ("mean reward, first → last logging step", f"{_number(done.get('first_reward'))} → "
                                                    f"{_number(done.get('last_reward'))}"),
        ("wall time", _duration(done["rl_runtime_s"]) if _is_number(done.get("rl_runtime_s")) else "not recorded"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"## Reinforcement learning\n\nAs `t2s rl` recorded it (`run/rl.done`).\n\n| | |\n|---|---|\n{table}"


def _precision(cfg: Config, done: dict) -> str:
    """How training kept its weights (train.done records what ran) and the dtype the published weights are in."""
    if done.get("precision"):
        trained = (f"`{done['precision']}`: trainable weights {done.get('weights_dtype', 'not recorded')}, compute "
                   f"{done.get('compute_dtype', 'not recorded')}, {done.get('optimizer', 'optimizer not recorded')}")
    else:
        trained = f"`{cfg.train.precision}` (from the config; this run's train did not record it)"
    return trained if cfg.push.artifact == "adapter" else f"{trained}; merged weights published in {cfg.merge.dtype}"


def run_span_s(run) -> float | None:
    """Seconds from the start of the run's first job to now (push): each job writes logs/<job>.config.yaml as it
    starts. None when no job left one."""
    from jobs.lib.rundir import JOBS

    starts = [path.stat().st_mtime for path in (run.job_config(job) for job in JOBS if job != "push") if path.is_file()]
    return max(0.0, time.time() - min(starts)) if starts else None


def _cost_section(cfg: Config, train_done: dict | None, run_span_s: float | None = None) -> str:
    done = train_done or {}
    if cfg.push.hardware:
        hardware = cfg.push.hardware
    elif done.get("gpu_name"):
        hardware = f"{done.get('num_gpus', '?')} × {done['gpu_name']}"
    elif done.get("num_gpus") == 0:
        hardware = "CPU (no GPU)"
    else:
        hardware = "unknown"
    runtime = done.get("train_runtime_s")
    rate = cfg.push.cost_per_hour_usd
    time_text = f"{_duration(runtime)} ({runtime:,.0f} s)" if _is_number(runtime) else "unknown"
    rows = [("hardware", hardware), ("training time", time_text)]
    if _is_number(run_span_s) and rate is not None:
        rows.append(("run time", f"{_duration(run_span_s)}, from the start of the run's first job to this push"))
        training = f"; training alone ≈ ${runtime / 3600 * rate:,.2f}" if _is_number(runtime) else ""
        cost = (f"≈ ${run_span_s / 3600 * rate:,.2f} at ${rate:g}/h for the run time (every job on the pod; the pod's "
                f"image pull and start-up before it and its end after the push are billed too and not included)"
                f"{training}")
    elif _is_number(runtime) and rate is not None:
        cost = (f"≈ ${runtime / 3600 * rate:,.2f} at ${rate:g}/h for training alone (the other jobs and the "
                "pod's start-up not included)")
    else:
        cost = "unknown"
    rows.append(("cost", cost))
    if cfg.push.attempts > 1:
        spent = [f"≈ {cfg.push.earlier_attempts_min:,.1f} min" if cfg.push.earlier_attempts_min is not None else "",
                 f"≈ ${cfg.push.earlier_attempts_usd:,.2f}" if cfg.push.earlier_attempts_usd is not None else ""]
        earlier = ", ".join(part for part in spent if part) or "time and cost unknown"
        rows.append(("attempts", f"{cfg.push.attempts} pods: {cfg.push.attempts - 1} preempted or lost before the one "
                                 f"that finished ({earlier}, not in the figures above)"))
    return "## Hardware, time and cost\n\n| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _files_section(adapter: bool, evaluated: bool) -> str:
    weights = ("adapter (`adapter_model.safetensors`, `adapter_config.json`)" if adapter
               else "model (`*.safetensors`, `config.json`)")
    lines = ["## Files", "", f"- the {weights}, tokenizer, chat template and `generation_config.json`"]
    if evaluated:
        lines.append("- `eval/`: the evaluation report (`report.json`, `report.md`), predictions and plots")
    lines += ["- `logs/`: the run's job logs and training metrics",
              "- `run/`: the resolved config, the data manifest and each job's completion record"]
    return "\n".join(lines)


def _decoding(scores: dict) -> str:
    """How a row's answers were decoded; a report from before decodings were recorded decoded greedily."""
    if scores.get("decoding") == "checked":
        return f"checked, up to {_count(scores.get('candidates'))} candidates"
    return "greedy"


def _model_label(label: str, base: str) -> str:
    label = label.removesuffix(CHECKED)  # the decoding has its own column
    if label == "base":
        return f"base (`{base}`)"
    if label.startswith("base:"):
        return f"base, {label.split(':', 1)[1].replace('_', '-')} prompt"
    return {"merged": "fine-tuned (merged)", "adapter": "fine-tuned (adapter)"}.get(label, label)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _percent(value: Any) -> str:
    """Report metrics are fractions of the examples, 0..1."""
    return f"{100 * value:.1f}%" if _is_number(value) else "not measured"


def _number(value: Any) -> str:
    """Four significant digits, never in scientific notation (12,346 rather than 1.235e+04)."""
    if not _is_number(value):
        return "not measured"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}" if abs(value) >= 1e-4 or value == 0 else f"{value:.8f}".rstrip("0")


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "not measured"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
