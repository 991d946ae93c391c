"""Where a fresh `t2s ask` process spends its time before the first answer: each stage timed in new processes.

    python bench/ask_startup.py --model runs/<id> [--device cuda] [--processes 1] [--decoders dynamic,auto]

Each process does what `t2s ask --model M --schema S QUESTION` does, in the same order, with a clock reading (since
the process started, from /proc) after each stage: Python and t2s's CLI imports, torch, CUDA's start, transformers,
the tokenizer, the model's weights, the move to the device, the first answer (with the CUDA graph capture, reported
apart) and a second answer. One more process runs under `python -X importtime` and names the slowest imports.
Prints one JSON object (and writes it to --out when given).

On one H200 with SmolLM2-135M: ~40 s (three processes of ~12 s: one per decoder and the -X importtime one).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = "CREATE TABLE songs (title VARCHAR, artist VARCHAR, genre VARCHAR, year INTEGER)"
QUESTION = "How many songs came out after 2000?"


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc), as jobs.ask_command.process_age_s, without importing jobs."""
    with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
        started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        return float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK")


def child(model: str, device: str | None) -> None:
    """One process's stages, as `t2s ask` runs them; prints {stage: seconds since the process started}."""
    sys.path.insert(0, str(ROOT))
    marks = {"python started": process_age_s()}
    import jobs.cli  # noqa: F401  (typer, sqlglot, pydantic: what `t2s` imports before any command runs)
    marks["t2s CLI imported"] = process_age_s()
    import torch
    marks["torch imported"] = process_age_s()
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if target.startswith("cuda"):
        torch.empty(1, device=target)
        marks["CUDA started"] = process_age_s()
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    marks["transformers imported"] = process_age_s()
    from jobs import ask
    from jobs.lib.generate import decoding_info
    from jobs.lib.models import load_model, load_tokenizer, pick_dtype

    source = ask.resolve_model(model)
    tokenizer = load_tokenizer(source.model)
    marks["tokenizer loaded"] = process_age_s()
    loaded = load_model(source.model, dtype=pick_dtype("auto"))
    marks["weights loaded"] = process_age_s()
    loaded = loaded.to(target).eval()
    if target.startswith("cuda"):
        torch.cuda.synchronize()
    marks["model on the device"] = process_age_s()
    generator = ask.SQLGenerator(loaded, tokenizer)
    generator.answers([(SCHEMA, QUESTION)], batch_size=1)
    marks["first answer"] = process_age_s()
    generator.answers([(SCHEMA, "Which genres have songs by nova?")], batch_size=1)
    marks["second answer"] = process_age_s()
    info = decoding_info(loaded)
    print(json.dumps({"marks": marks, "decoding": info, "torch": torch.__version__}))


def run_child(model: str, device: str | None, decoder: str, importtime: bool = False) -> tuple[dict, str]:
    command = [sys.executable, *(["-X", "importtime"] if importtime else []), __file__, "--child", "--model", model,
               *(["--device", device] if device else [])]
    env = {**os.environ, "T2S_DECODER": decoder, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if result.returncode != 0:
        sys.exit(f"the timed process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def slowest_imports(importtime_log: str, count: int = 15) -> list[tuple[str, float]]:
    """Top-level-ish modules by cumulative import time, from `python -X importtime`'s stderr (microseconds)."""
    rows = []
    for line in importtime_log.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if cumulative.strip().isdigit() and len(name) - len(name.lstrip()) <= 3:  # depth 0 or 1
            rows.append((name.strip(), int(cumulative) / 1e6))
    return [(name, round(seconds, 3)) for name, seconds in sorted(rows, key=lambda r: -r[1])[:count]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="run directory or model folder, as `t2s ask --model`")
    parser.add_argument("--device", default=None)
    parser.add_argument("--processes", type=int, default=1, help="processes per decoder (medians over them)")
    parser.add_argument("--decoders", default="dynamic,auto", help="T2S_DECODER values to compare")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.model, args.device)

    report = {"model": args.model, "processes": args.processes, "decoders": {}}
    for decoder in args.decoders.split(","):
        runs = [run_child(args.model, args.device, decoder)[0] for _ in range(args.processes)]
        stages = list(runs[0]["marks"])
        median = {stage: round(statistics.median(r["marks"][stage] for r in runs), 2) for stage in stages}
        steps, previous = {}, 0.0
        for stage in stages:
            steps[stage] = round(median[stage] - previous, 2)
            previous = median[stage]
        report["decoders"][decoder] = {"since_start_s": median, "stage_s": steps, "decoding": runs[-1]["decoding"],
                                       "torch": runs[-1]["torch"]}
        print(decoder, json.dumps(steps), flush=True)
    _, log = run_child(args.model, args.device, args.decoders.split(",")[-1], importtime=True)
    report["slowest_imports_s"] = slowest_imports(log)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "ask_startup.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
