"""export: the merged model as GGUF files for llama.cpp / Ollama / LM Studio, and an Ollama Modelfile, checked against
the merged model before the job is done.

    runs/<id>/export/<name>.<quant>.gguf   f16 and q8_0 by llama.cpp's own converter (convert_hf_to_gguf.py with the
                                           gguf-py that ships beside it); q4_k_m by llama.cpp's quantizer from the f16
    runs/<id>/export/Modelfile             FROM the smallest file; TEMPLATE renders jobs.chat's prompt; every stop id

The converter and the quantizer are one pinned pair: llama-cpp-python LLAMA_CPP_PYTHON (its sdist vendors llama.cpp
with the converter, its conversion/ package and the matching gguf-py; `make install` and the cu12 image put them in
<prefix>/share/t2s/llama.cpp and install the library, built once into a cached wheel). Nothing is downloaded at run
time.

The pinned pair's tools: jobs.lib.llama_cpp. Checks (jobs.lib.gguf_check): every file is read back (architecture, tensor count and shapes, vocabulary, chat template,
BOS and end-of-turn ids); the f16 file loaded by transformers' GGUF loader must answer the first export.check_rows
validation questions token for token as the merged model does (both fp32); every file run through llama.cpp (in a
worker process) must tokenize the prompt exactly as t2s does (one BOS), end a turn at every t2s stop id, and agree with
the merged model on export.min_agreement of the rows. A failed check is one line naming the first disagreement.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from jobs.lib.config import Config
from jobs.lib.errors import T2SError
from jobs.lib.llama_cpp import (LLAMA_CPP_PYTHON, check_converter, check_llama_cpp, conversion_input, convert,
                                llama_cpp_prompt, supported_architectures)
from jobs.lib.rundir import RunDir, fresh_staging

QUANTS = ("f16", "q8_0", "q4_k_m")
CONVERTER_OUTTYPES = {"f16": "f16", "q8_0": "q8_0"}  # what convert_hf_to_gguf.py writes itself; the rest: quantizer
_SYSTEM, _USER = "\x00T2S_SYSTEM\x00", "\x00T2S_USER\x00"

# ---------- pure core ----------


def export_dir(run: RunDir) -> Path:
    return run.root / "export"


def file_name(name: str, quant: str) -> str:
    return f"{name}.{quant}.gguf"


def quants_in_order(quants: list[str]) -> list[str]:
    """The requested quants, f16 first (q4_k_m is made from it), each once."""
    return [q for q in QUANTS if q in quants]


def modelfile_template(prompt: str, bos_token: str | None, leading_space: bool = False) -> str:
    """The Go template of Ollama's TEMPLATE for a prompt rendered with the sentinels _SYSTEM and _USER: the same
    text with {{ .System }} and {{ .Prompt }} in their place (llama_cpp_prompt; `leading_space`: see
    conversion_input). llama.cpp adds the BOS itself when t2s's tokenizer does (tokenizer.ggml.add_bos_token)."""
    prompt = llama_cpp_prompt(prompt, bos_token, leading_space)
    if "{{" in prompt or "}}" in prompt or '"""' in prompt:
        raise T2SError("the chat template writes '{{', '}}' or '\"\"\"' as text, which an Ollama Modelfile cannot "
                       "hold: export the GGUF files without a Modelfile (export.modelfile: false)")
    if prompt.count(_SYSTEM) != 1 or prompt.count(_USER) != 1:
        raise T2SError("the chat template does not put the system message and the question in the prompt once each: "
                       "it cannot be written as an Ollama TEMPLATE (export.modelfile: false)")
    return prompt.replace(_SYSTEM, "{{ .System }}").replace(_USER, "{{ .Prompt }}")


def modelfile_text(gguf_file: str, template: str, stops: list[str], others: list[str]) -> str:
    def quoted(text: str) -> str:
        return json.dumps(text)  # Ollama reads a double-quoted string with JSON's escapes

    lines = ["# t2s export: `ollama create NAME -f Modelfile`, then `ollama run NAME` (the system message is the "
             "CREATE TABLE statements, the prompt the question).",
             *([f"# Other files of this export (change FROM to use one): {', '.join(others)}"] if others else []),
             f"FROM ./{gguf_file}", f'TEMPLATE """{template}"""',
             *(f"PARAMETER stop {quoted(stop)}" for stop in stops),
             "PARAMETER temperature 0", "PARAMETER top_k 1", "PARAMETER repeat_penalty 1", ""]
    return "\n".join(lines)


def render_modelfile_template(template: str, system: str, prompt: str) -> str:
    """What Ollama renders from the TEMPLATE this module writes (it only uses {{ .System }} and {{ .Prompt }})."""
    return template.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


def first_disagreement(reference: list[dict], candidate: list[dict]) -> int | None:
    """The first row whose answer (text, and whether the model ended it) differs."""
    return next((i for i, (r, c) in enumerate(zip(reference, candidate))
                 if (r["text"], r["ended"]) != (c["text"], c["ended"])), None)


def agreement(reference: list[dict], candidate: list[dict]) -> float:
    same = sum((r["text"], r["ended"]) == (c["text"], c["ended"]) for r, c in zip(reference, candidate))
    return same / max(len(reference), 1)


def describe_row(i: int, row: dict, merged: dict, other: dict, label: str) -> str:
    differs_at = next((k for k, (a, b) in enumerate(zip(merged["text"], other["text"])) if a != b),
                      min(len(merged["text"]), len(other["text"])))
    start = max(0, differs_at - 30) if len(merged["text"]) > 80 or len(other["text"]) > 80 else 0

    def short(text: str, cut: int = 0) -> str:
        text = ("..." if cut else "") + text[cut:].replace("\n", "\\n")
        return json.dumps(text if len(text) <= 80 else text[:77] + "...", ensure_ascii=False)

    ending = lambda answer: "" if answer["ended"] else " (cut at max_new_tokens)"  # noqa: E731
    return (f"row {i} ({short(row['question'])}): merged {short(merged['text'], start)}{ending(merged)}, "
            f"{label} {short(other['text'], start)}{ending(other)}")


# ---------- the job ----------


def check(cfg: Config, run: RunDir) -> None:
    run.require("merge", "export")
    converter = check_converter()
    config = json.loads((run.merged / "config.json").read_text())
    architectures = config.get("architectures") or []
    known = supported_architectures(converter / "conversion")
    if not architectures or not set(architectures) & known:
        raise T2SError(f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON}) does not support the "
                       f"architecture {'/'.join(architectures) or 'none'} of {run.merged}: export needs one it "
                       "supports (Llama, Mistral, Qwen2, ...; see conversion/ in the converter's folder)")
    if "q4_k_m" in cfg.export.quant or cfg.export.llama_cpp_check:
        check_llama_cpp()


def run(cfg: Config, run: RunDir) -> str:
    from jobs.lib import gguf_check

    converter = check_converter()
    final = export_dir(run)
    name = cfg.export.name or cfg.run_id
    quants = quants_in_order(cfg.export.quant)
    checked_marks = [f".{file_name(name, q)}.made" for q in quants]
    # an interrupted export keeps the files it had made and checked in export.partial/: a rerun goes on from there
    staging = fresh_staging(final, keep=tuple(file_name(name, q) for q in quants) + tuple(checked_marks))
    source_folder, leading_space = conversion_input(cfg, run, staging)
    made = []
    for quant in quants:
        target = staging / file_name(name, quant)
        mark = staging / f".{target.name}.made"
        if target.is_file() and mark.is_file() and mark.read_text() == run.marker("merge").read_text():
            print(f"  {target.name}: made by an interrupted export; kept (checked again below)", flush=True)
            continue
        partial = target.with_name(target.name + ".tmp")
        if quant in CONVERTER_OUTTYPES:
            print(f"  converting to {quant} with llama.cpp's converter ...", flush=True)
            convert(converter, source_folder, partial, CONVERTER_OUTTYPES[quant])
        else:
            source = staging / file_name(name, "f16")
            if not source.is_file():
                source = staging / f".{name}.f16.source.gguf"
                if not source.is_file():
                    convert(converter, source_folder, source.with_name(source.name + ".tmp"), "f16")
                    os.replace(source.with_name(source.name + ".tmp"), source)
            print(f"  quantizing to {quant} with llama.cpp's quantizer ...", flush=True)
            gguf_check.quantize(source, partial, quant)
        os.replace(partial, target)
        mark.write_text(run.marker("merge").read_text())  # made from this merge (checked once all are made)
        made.append(quant)
    for leftover in staging.glob(".*.source.gguf"):
        leftover.unlink()
    shutil.rmtree(staging / ".convert-input", ignore_errors=True)

    checks = check_files(cfg, run, staging, name, quants, leading_space)
    for mark in checked_marks:
        (staging / mark).unlink(missing_ok=True)
    if cfg.export.modelfile:
        (staging / "Modelfile").write_text(make_modelfile(run, name, quants, leading_space))
    sizes = {q: (staging / file_name(name, q)).stat().st_size for q in quants}
    run.finish("export", cfg, [(staging, final)], format=cfg.export.format, quants=quants, name=name,
               files={q: file_name(name, q) for q in quants}, sizes=sizes, checks=checks,
               llama_cpp_python=LLAMA_CPP_PYTHON, converter=str(converter), leading_space=leading_space)
    listed = ", ".join(f"{file_name(name, q)} ({sizes[q] / 2**20:.1f} MiB)" for q in quants)
    return f"{listed} in {final}; " + "; ".join(f"{q}: {c['summary']}" for q, c in checks.items())


def make_modelfile(run: RunDir, name: str, quants: list[str], leading_space: bool) -> str:
    from jobs.lib.chat import render_prompt, stop_token_ids
    from jobs.lib.models import load_tokenizer

    tokenizer = load_tokenizer(str(run.merged))
    template = modelfile_template(render_prompt(tokenizer, _SYSTEM, _USER), tokenizer.bos_token, leading_space)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(tokenizer)]
    smallest = max(quants, key=QUANTS.index)  # q4_k_m, else q8_0, else f16
    return modelfile_text(file_name(name, smallest), template, stops,
                          [file_name(name, q) for q in quants if q != smallest])


def check_rows(run: RunDir, n: int) -> list[dict]:
    for split in ("validation", "test", "train"):
        path = run.split(split)
        rows = [json.loads(line) for line in path.read_text().splitlines()[:n] if line.strip()] \
            if path.is_file() else []
        if rows:
            return rows
    raise T2SError(f"no prepared rows in {run.data} to check the export on: run `t2s prep` again")


def check_files(cfg: Config, run: RunDir, folder: Path, name: str, quants: list[str],
                leading_space: bool) -> dict[str, dict]:
    """Every check of the module docstring; one line (T2SError) for the first that fails. {quant: what it found}."""
    import torch

    from jobs.lib import gguf_check
    from jobs.lib.chat import render_prompt, stop_token_ids
    from jobs.lib.generate import generate_batched
    from jobs.lib.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(run.merged))
    stops = stop_token_ids(tokenizer)
    merged_config = json.loads((run.merged / "config.json").read_text())
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    expected = {"architecture": "llama" if "Llama" in "".join(merged_config.get("architectures", [])) else None,
                "tensors": gguf_check.expected_tensor_count(run.merged),
                "layers": merged_config.get("num_hidden_layers")}
    results: dict[str, dict] = {}
    for quant in quants:
        path = folder / file_name(name, quant)
        summary = gguf_check.read_gguf(path)
        problems = gguf_check.read_back_problems(
            summary, architecture=expected["architecture"] or summary.architecture, tensors=expected["tensors"],
            layers=expected["layers"], vocab=vocab, chat_template=tokenizer.chat_template, stop_ids=stops,
            bos_id=tokenizer.bos_token_id if summary.add_bos else None)
        if problems:
            raise T2SError(f"{path.name} does not read back as the merged model: {problems[0]}"
                           f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}")
        results[quant] = {"read_back": "ok", "tensors": summary.tensor_count}

    rows = check_rows(run, cfg.export.check_rows)
    prompts = [render_prompt(tokenizer, r["context"], r["question"]) for r in rows]
    model = load_model(str(run.merged), dtype=torch.float32).eval()
    merged = [{"text": g.text, "ended": bool(g.ended_at_eos)} for g in
              generate_batched(model, tokenizer, prompts, 8, cfg.export.max_new_tokens, decoder="dynamic")]
    del model
    merged_ids = [tokenizer(p)["input_ids"] for p in prompts]

    if "f16" in quants:
        # transformers' GGUF loader, fp32: token for token. The weights only: transformers rebuilds a SentencePiece
        # vocabulary from a GGUF file as a BPE with merges of its own (it split TinyLlama's "<|system|>" into other
        # pieces), so the prompts go in as the merged tokenizer's ids; the file's tokenizer is checked by llama.cpp.
        gguf_model = load_model(str(folder), gguf_file=file_name(name, "f16"), dtype=torch.float32).eval()
        answers = [{"text": g.text, "ended": bool(g.ended_at_eos)} for g in
                   generate_batched(gguf_model, tokenizer, prompts, 8, cfg.export.max_new_tokens, decoder="dynamic")]
        del gguf_model
        wrong = first_disagreement(merged, answers)
        if wrong is not None:
            raise T2SError(f"{file_name(name, 'f16')} loaded by transformers (fp32) does not answer as the merged "
                           f"model: {describe_row(wrong, rows[wrong], merged[wrong], answers[wrong], 'f16')}; the "
                           "conversion lost something: report it with the run's logs/export.log")
        results["f16"]["transformers"] = f"{len(rows)}/{len(rows)} answers identical"

    if cfg.export.llama_cpp_check:
        threshold = cfg.export.min_agreement.model_dump()
        for quant in quants:
            path = folder / file_name(name, quant)
            found = gguf_check.llama_cpp_answers(path, [llama_cpp_prompt(p, tokenizer.bos_token, leading_space)
                                                        for p in prompts], stops, cfg.export.max_new_tokens,
                                                 threads=cfg.export.threads)
            problem = prompt_problem(found, merged_ids, prompts)
            if problem:
                raise T2SError(f"{path.name} in llama.cpp: {problem}")
            not_eog = [int(i) for i, eog in found["eog"].items() if not eog]
            if not_eog:
                raise T2SError(f"{path.name}: llama.cpp does not end a turn at t2s's stop id(s) {not_eog} "
                               f"({tokenizer.convert_ids_to_tokens(not_eog)}): answers would run on; the tokenizer's "
                               "eos / generation_config do not name its end-of-turn token")
            answers = found["answers"]
            share = agreement(merged, answers)
            if share < threshold[quant]:
                wrong = first_disagreement(merged, answers)
                raise T2SError(f"{path.name} in llama.cpp agrees with the merged model on {share:.0%} of "
                               f"{len(rows)} rows (< export.min_agreement.{quant} {threshold[quant]:.0%}); first: "
                               f"{describe_row(wrong, rows[wrong], merged[wrong], answers[wrong], quant)}")
            ended = sum(a["ended"] for a in answers)
            results[quant]["llama_cpp"] = {"agreement": share, "ended": ended, "rows": len(rows)}
            same = ", transformers identical" if "transformers" in results[quant] else ""
            results[quant]["summary"] = f"read back ok{same}, llama.cpp agrees on {share:.0%} of {len(rows)} rows"
    for quant in quants:
        results[quant].setdefault("summary", "read back ok" + (", transformers identical" if quant == "f16" else ""))
    return results


def prompt_problem(found: dict, merged_ids: list[list[int]], prompts: list[str]) -> str | None:
    """Whether llama.cpp's tokens of each prompt are t2s's own (so: the same template text, one BOS)."""
    bos = found["bos_id"]
    for i, (theirs, ours) in enumerate(zip(found["prompt_tokens"], merged_ids)):
        if len(theirs) > 1 and theirs[0] == theirs[1] == bos:
            return (f"the prompt of row {i} starts with two BOS tokens in llama.cpp: the chat template writes the BOS "
                    "that llama.cpp adds again")
        if theirs != ours:
            if theirs.count(bos) != ours.count(bos):
                return (f"the prompt of row {i} has {theirs.count(bos)} BOS token(s) in llama.cpp and "
                        f"{ours.count(bos)} in t2s: the BOS is doubled (or lost)")
            at = next((k for k, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            return (f"llama.cpp tokenizes the prompt of row {i} differently from t2s (from token {at}: "
                    f"{theirs[at:at + 5]} vs {ours[at:at + 5]}): its tokenizer is not the merged model's")
    return None


# ---------- `t2s eval` of an exported file (eval.models: [gguf:q4_k_m]) ----------

GGUF_MODEL = "gguf:"


def exported_file(run: RunDir, quant: str) -> Path:
    """The exported file of `quant`, or one line saying how to make it."""
    run.require("export", f"eval of {GGUF_MODEL}{quant}")
    done = json.loads(run.marker("export").read_text())
    if quant not in done.get("files", {}):
        raise T2SError(f"eval.models has {GGUF_MODEL}{quant}, but the export in {export_dir(run)} made "
                       f"{', '.join(done.get('quants', [])) or 'no file'}: add {quant} to export.quant and run "
                       "`t2s export --force`")
    return export_dir(run) / done["files"][quant]


def gguf_generations(cfg: Config, run: RunDir, rows: list[dict], which: str) -> tuple[list, float, dict]:
    """The exported file's greedy answers through llama.cpp (a worker process), as eval's Generations; the seconds
    generating took (loading left out, as for the other models) and how they were decoded."""
    from jobs.lib import gguf_check
    from jobs.lib.chat import render_prompt, stop_token_ids
    from jobs.lib.generate import Generation
    from jobs.lib.models import load_tokenizer

    path = exported_file(run, which.removeprefix(GGUF_MODEL))
    leading_space = bool(json.loads(run.marker("export").read_text()).get("leading_space"))
    gguf_check.read_gguf(path)  # a damaged file is one line before llama.cpp sees it
    tokenizer = load_tokenizer(str(run.merged))
    prompts = [llama_cpp_prompt(render_prompt(tokenizer, r["context"], r["question"]), tokenizer.bos_token,
                                leading_space) for r in rows]
    found = gguf_check.llama_cpp_answers(path, prompts, stop_token_ids(tokenizer), cfg.eval.max_new_tokens,
                                         threads=cfg.export.threads)
    generations = [Generation(text=a["text"], new_tokens=len(a["ids"]), latency_s=a["seconds"], ended_at_eos=a["ended"])
                   for a in found["answers"]]
    elapsed = sum(a["seconds"] for a in found["answers"])
    return generations, elapsed, {"backend": "llama.cpp", "compile_s": 0.0, "graphs": 0, "fallback": None}
