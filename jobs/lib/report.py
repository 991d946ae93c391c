"""An eval report for people: report.md's tables and sections, and metrics.png. eval writes them; compare puts two
runs' reports side by side with the same pieces. Pure functions of the report's dict (eval/report.json), so a report
from an older t2s renders too (what it lacks is left out)."""

from __future__ import annotations

from pathlib import Path

METRICS = ("sql_only", "exact_match", "execution_accuracy")
CHECKED = "+checked"  # the label suffix of a model's checked-decoding row


def render_markdown(report: dict) -> str:
    labels = list(report["results"])
    lines = [f"# t2s eval · run {report['run_id']} · "
             f"{subset(report['n_examples'], {'rows': {report['split']: report.get('split_rows')}}, report['split'])}",
             "",
             f"Base model: `{report['models']['base']}` · fine-tuned: `{report['models'].get('finetuned')}` · "
             f"dataset `{report['dataset']['source']}` (hash {report['dataset']['hash'][:12]})", "",
             "| model | decoding | SQL-only | exact match | execution accuracy | fails to execute | gold fails to run "
             "| tables cannot be built | queries/s | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in labels:
        r = report["results"][label]
        lines.append(f"| {label} | {decoding_mode(r)} | {r['sql_only']:.1%} | {r['exact_match']:.1%} | "
                     f"{r['execution_accuracy']:.1%} | {_share(r.get('fails_to_execute'))} | {r['gold_error']} | "
                     f"{r['build_error']} | {r['queries_per_s']:.1f} | {r['tokens_per_s']:.0f} |")
    lines += render_decoding(report)
    if report["build_errors"]:
        lines += ["", "Examples whose tables SQLite cannot hold (left out of execution accuracy): "
                  + "; ".join(f"{reason} ({count})" for reason, count in report["build_errors"].items()) + "."]
    lines += render_greedy_vs_checked(report)
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
    if "training_curves" in report:  # the pictures beside the report (none listed by a report from before them)
        lines += ["![scores](metrics.png)", ""]
        if report["training_curves"]:
            lines += [f"![training: loss and learning rate per step]({report['training_curves']})", ""]
    return "\n".join(lines + render_endings(report))


def decoding_mode(result: dict) -> str:
    """How a row's answers were decoded, in a few words (a report from before decodings were recorded: greedy)."""
    if result.get("decoding") == "checked":
        return f"checked, up to {result.get('candidates', '?')} candidates"
    if result.get("decoding") == "vote":
        return f"vote, greedy + {result.get('samples', '?')} samples"
    return "greedy"


def _share(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "not measured"


def render_greedy_vs_checked(report: dict) -> list[str]:
    """The report's greedy vs checked section: each model's two rows side by side, with what the checks did."""
    results = report["results"]
    pairs = [(label[:-len(CHECKED)], label) for label in results if label.endswith(CHECKED)
             and label[:-len(CHECKED)] in results]
    if not pairs:
        return []
    lines = ["", "## Greedy vs checked decoding", "",
             "Checked decoding answers with the first candidate that finishes, parses, resolves against the schema and "
             "runs on databases built from it: the greedy answer, else a beam search's, best-scored first; when none "
             "passes, the best-scored one (unchecked). Its queries/s include the greedy answers, the checks and the "
             "search.", "",
             "| model | decoding | SQL-only | exact match | execution accuracy | fails to execute | queries/s "
             "| passed the checks | needed the search |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for greedy, checked_label in pairs:
        for label in (greedy, checked_label):
            r = results[label]
            checks = (f"{_share(r.get('passed_checks'))} | {_share(r.get('searched'))}" if label == checked_label
                      else " | ")
            lines.append(f"| {greedy} | {decoding_mode(r)} | {r['sql_only']:.1%} | {r['exact_match']:.1%} | "
                         f"{r['execution_accuracy']:.1%} | {_share(r.get('fails_to_execute'))} | "
                         f"{r['queries_per_s']:.1f} | {checks} |")
    return lines


def compile_note(result: dict) -> str:
    """", 1.2 s of CUDA graph capture" when there was any; and why a faster decoder was given up, when it was."""
    note = f", {result['compile_s']:.1f} s of CUDA graph capture" if result.get("compile_s") else ""
    return note + (f"; fell back: {result['decoder_fallback']}" if result.get("decoder_fallback") else "")


def render_decoding(report: dict) -> list[str]:
    """Which decoder answered for each model, and its one-time compile cost (none for a report from before)."""
    parts = [f"{label}: {r['decoder']}{compile_note(r)}" for label, r in report["results"].items() if "decoder" in r]
    if not parts:
        return []
    captured = any(r.get("compile_s") for r in report["results"].values())  # none on a CPU: nothing to leave out
    head = "Decoding (jobs.lib.generate; queries/s leave out the one-time CUDA graph captures): " if captured else \
        "Decoding (jobs.lib.generate): "
    return ["", head + "; ".join(parts) + "."]


def subset(n: int, manifest: dict, split: str) -> str:
    """What eval scored, named apart from prep's count of the split: "all 40 test examples", or "the first 12 of the
    40 test examples (eval.max_examples)"."""
    total = (manifest.get("rows") or {}).get(split)
    if isinstance(total, int) and n < total:
        return f"the first {n} of the {total} {split} examples (eval.max_examples)"
    return f"all {n} {split} examples" if isinstance(total, int) else f"{split} split, {n} examples"


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
