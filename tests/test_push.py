"""`t2s push` against a fake Hub (tests/fake_hub.py) on 127.0.0.1.

The push runs as users run it: `t2s push --config ...` (python -m jobs.cli push) in a subprocess whose HF_ENDPOINT points at
the fake (huggingface_hub reads it at import) and HF_HUB_DISABLE_XET=1 (legacy LFS, which the fake speaks).
The run directory is a hand-made fixture: tiny fake safetensors, tokenizer files, an eval report, logs.
The card's renderer and the prompt-prefix check are pure and tested directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from tests.fake_hub import FakeHub
from jobs.lib.config import PushGates, load_config
from jobs.lib.card import render_model_card, trained_prompt_suffix
from jobs.push import gate_failures

# huggingface_hub's own LFS upload passes data= to httpx2, which warns about it
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

# huggingface_hub 1.x's client is httpx (or httpx2), 0.x's (the cu118 set) is requests: their names for a refused
# connection and for one closed without an answer, which the retry lines and the error show
HTTPX_HUB = hasattr(huggingface_hub, "set_client_factory")
REFUSED, DROPPED = ("ConnectError", "RemoteProtocolError") if HTTPX_HUB else ("ConnectionError", "ConnectionError")

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TESTtokenMustNeverLeak0123456789abcdef"
OTHER_TOKEN = "hf_INVALIDtokenMustNeverLeakEither987654"
REPO = "alice/t2s-sql"
TINYLLAMA_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
# The same with no newline after the generation prompt: training puts "<|assistant|>\n" before the SQL, while
# add_generation_prompt=True stops at "<|assistant|>" (the trap jobs/lib/card.py's trained_prompt_suffix describes).
NO_NEWLINE_TEMPLATE = TINYLLAMA_TEMPLATE.replace("{{ '<|assistant|>' }}\n{% endif %}", "{{ '<|assistant|>' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
REPORT = {
    "run_id": "r1", "split": "test", "n_examples": 300,
    "dataset": {"source": "b-mc2/sql-create-context", "hash": "abc123",
                "splits": {"train": 70000, "validation": 3900, "test": 3900}},
    "models": {"base": "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "finetuned": "runs/r1/merged"},
    "results": {
        "base": {"sql_only": 0.02, "exact_match": 0.0, "execution_accuracy": 0.01, "gold_error": 3, "n": 300,
                 "queries_per_s": 30.5, "tokens_per_s": 900.0, "latency_ms_mean": 33.0},
        "merged": {"sql_only": 0.99, "exact_match": 0.7345, "execution_accuracy": 0.81, "gold_error": 3, "n": 300,
                   "queries_per_s": 36.0, "tokens_per_s": 1000.0},  # no latency: must read "not measured"
    },
    "buckets": {}, "config": {},
}
TRAIN_DONE = {"job": "train", "finished_at": "2025-01-01T00:00:00Z", "train_runtime_s": 5400.0, "global_step": 1200,
              "examples_seen": 150000, "num_gpus": 2, "num_processes": 2, "gpu_name": "NVIDIA H100 80GB HBM3",
              "train_loss": 0.31}


def fake_safetensors(values: int, seed: int) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    return struct.pack("<Q", len(header)) + header + struct.pack(f"<{values}f", *[seed + i / 7 for i in range(values)])


def tokenizer_files() -> dict[str, str]:
    return {
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}),
        "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": TINYLLAMA_TEMPLATE}),
        "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
    }


def make_run(tmp: Path, *, evaluated: bool = True, push: dict | None = None) -> tuple[Path, Path]:
    """A finished run (prep, train, merge and, if `evaluated`, eval) and its config; (config path, run dir)."""
    root = tmp / "runs" / "r1"
    files: dict[str, str | bytes] = {
        "merged/model.safetensors": fake_safetensors(64, 1),
        "merged/config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}),
        "merged/generation_config.json": json.dumps({"do_sample": False, "max_new_tokens": 256}),
        "merged/chat_template.jinja": TINYLLAMA_TEMPLATE,
        "adapter/adapter_model.safetensors": fake_safetensors(16, 2),
        "adapter/adapter_config.json": json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                   "base_model_name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}),
        "adapter/README.md": "---\nlibrary_name: peft\n---\n# peft's own template card\n",
        "logs/train.log": "step 10 loss 1.2\nstep 20 loss 0.9\n",
        "logs/metrics.jsonl": '{"step": 10, "loss": 1.2}\n{"step": 20, "loss": 0.9}\n',
        "logs/push.log": "an earlier push's log\n",
        "data/manifest.json": json.dumps({"rows": {"train": 70000, "validation": 3900, "test": 3900}}),
        "config.resolved.yaml": "run_id: r1\n",
        "prep.done": json.dumps({"job": "prep", "finished_at": "2025-01-01T00:00:00Z"}),
        "train.done": json.dumps(TRAIN_DONE),
        "merge.done": json.dumps({"job": "merge", "finished_at": "2025-01-01T00:00:00Z"}),
        "eval/report.json": json.dumps(REPORT),
        "eval/report.md": "# Eval report\n",
        "eval/predictions.jsonl": '{"question": "q", "prediction": "SELECT 1"}\n',
        "eval/accuracy.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
    }
    for name in ("merged", "adapter"):
        files.update({f"{name}/{k}": v for k, v in tokenizer_files().items()})
    if evaluated:
        files["eval.done"] = json.dumps({"job": "eval", "finished_at": "2025-01-01T00:00:00Z"})
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    config = {
        "run_id": "r1", "runs_dir": str(tmp / "runs"),
        "model": {"name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"},
        "train": {"method": "lora", "lora": {"r": 16, "alpha": 32}, "epochs": 2.0, "learning_rate": 2.0e-4,
                  "per_device_batch_size": 16},
        "push": {"repo_id": REPO, "hardware": "2 × H100 (RunPod)", "cost_per_hour_usd": 5.0, "retries": 2,
                 **(push or {})},
    }
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return config_path, root


@pytest.fixture
def hub():
    with FakeHub({TOKEN: ["alice"]}) as fake:
        yield fake


@pytest.fixture
def workdir(tmp_path):
    for name in ("home", "hf_home", "tmp", "cwd"):
        (tmp_path / name).mkdir()
    return tmp_path


def push(workdir: Path, config: Path, endpoint: str, *sets: str, token: str | None = TOKEN, **env_extra: str):
    """`t2s push --config ... --force` as a user runs it, with a clean environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "T2S_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HOME=str(workdir / "hf_home"), HOME=str(workdir / "home"), TMPDIR=str(workdir / "tmp"),
               PYTHONPATH=str(ROOT), T2S_PUSH_BACKOFF_S="0.01", **env_extra)
    if token is not None:
        env["HF_TOKEN"] = token
    args = [sys.executable, "-m", "jobs.cli", "push", "--config", str(config), "--force"]
    for item in sets:
        args += ["--set", item]
    # cwd: an empty folder, so that no .env (the project's, with a real token) is read
    return subprocess.run(args, cwd=workdir / "cwd", env=env, capture_output=True, text=True, timeout=60)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def push_here(workdir, hub, monkeypatch, capsys):
    """`t2s push --config ... --force` in this process (fast): HF_ENDPOINT's effect is patched in, since
    huggingface_hub reads it at import. Used for the error paths; the main flows run in a subprocess."""
    import huggingface_hub.constants

    from jobs.cli import app

    def run(config: Path, *sets: str, token: str | None = TOKEN, endpoint: str | None = None, **env: str) -> Result:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint or hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.chdir(workdir / "cwd")
        for name in ("HF_TOKEN", "T2S_PUSH_TIMEOUT_S"):
            monkeypatch.delenv(name, raising=False)
        if token is not None:
            monkeypatch.setenv("HF_TOKEN", token)
        for name, value in {"T2S_PUSH_BACKOFF_S": "0.01", **env}.items():
            monkeypatch.setenv(name, value)
        args = ["push", "--config", str(config), "--force"] + [a for item in sets for a in ("--set", item)]
        with pytest.raises(SystemExit) as exit_:
            app(args, prog_name="t2s")
        out = capsys.readouterr()
        return Result(exit_.value.code or 0, out.out, out.err)

    yield run
    # the job set huggingface_hub's HTTP client up with its timeout: give later tests the library's default
    if HTTPX_HUB:
        from huggingface_hub.utils._http import default_client_factory

        huggingface_hub.set_client_factory(default_client_factory)
    else:
        huggingface_hub.configure_http_backend()


def tree_digest(root: Path, parts=("merged", "adapter", "eval", "data")) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for part in parts for p in sorted((root / part).rglob("*")) if p.is_file()}


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the card (pure)


def test_card_metadata_eval_table_training_and_cost(tmp_path):
    config, _ = make_run(tmp_path)
    card = render_model_card(load_config(config), REPO, report=REPORT, train_done=TRAIN_DONE, prompt_suffix="\n")
    meta = front_matter(card)
    assert meta["base_model"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert meta["datasets"] == ["b-mc2/sql-create-context"]
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["library_name"] == "transformers"
    assert {"text-to-sql", "sql", "t2s"} <= set(meta["tags"])
    assert "| base (`TinyLlama/TinyLlama-1.1B-Chat-v1.0`) | 2.0% | 0.0% | 1.0% | 300 | 3 |" in card
    assert "| fine-tuned (merged) — **this repo** | 99.0% | 73.5% | 81.0% | 300 | 3 |" in card
    assert "| fine-tuned (merged) | 36 | 1,000 | not measured |" in card  # no latency in the report
    assert "| train | 70,000 |" in card and "| test | 3,900 |" in card and "content hash `abc123`" in card
    assert "r=16, alpha=32" in card and "| learning rate | 0.0002, cosine" in card
    assert ("| precision | `fp32_master` (from the config; this run's train did not record it); merged weights "
            "published in bfloat16 |") in card  # TRAIN_DONE predates train.precision
    assert "16 per device × 1 accumulation × 2 processes = 32 per step" in card
    assert "| hardware | 2 × H100 (RunPod) |" in card
    assert "| training time | 1 h 30 min (5,400 s) |" in card
    assert "≈ $7.50 at $5/h for training alone (the other jobs" in card and card.count("training time") == 1
    # usage: chat template, system = schema, user = question, greedy, and the trained prefix
    assert 'add_generation_prompt=True)\nprompt += "\\n"' in card
    assert "do_sample=False" in card and '{"role": "system", "content": schema}' in card



def test_card_shows_the_decoding_each_row_came_from_and_gates_read_the_greedy_row(tmp_path):
    config, _ = make_run(tmp_path)
    greedy_only = render_model_card(load_config(config), REPO, report=REPORT, train_done=TRAIN_DONE, prompt_suffix="\n")
    assert "| fine-tuned (merged) — **this repo** | 99.0% | 73.5% | 81.0% | 300 | 3 | greedy |" in greedy_only
    assert "| fine-tuned (merged) | 36 | 1,000 | not measured | greedy |" in greedy_only
    assert "Checked (" not in greedy_only
    checked = {**REPORT["results"]["merged"], "exact_match": 0.75, "execution_accuracy": 0.84, "queries_per_s": 20.0,
               "decoding": "checked", "candidates": 4}
    report = {**REPORT, "results": {**REPORT["results"], "merged": {**REPORT["results"]["merged"], "decoding": "greedy"},
                                    "merged+checked": checked}}
    card = render_model_card(load_config(config), REPO, report=report, train_done=TRAIN_DONE, prompt_suffix="\n")
    assert "| fine-tuned (merged) — **this repo** | 99.0% | 73.5% | 81.0% | 300 | 3 | greedy |" in card
    assert ("| fine-tuned (merged), checked decoding — **this repo** | 99.0% | 75.0% | 84.0% | 300 | 3 | checked, up to 4 "
            "candidates |" in card)
    assert "| fine-tuned (merged), checked decoding | 20 | 1,000 | not measured | checked, up to 4 candidates |" in card
    assert "Checked (t2s's checked decoding, `t2s ask --decoding checked`)" in card
    assert gate_failures(report, PushGates(min_execution_accuracy=0.82), "merged")[0] == [
        "execution accuracy 81.0% < push.gates.min_execution_accuracy 82.0%"]  # the greedy row, as the usage shows

def test_card_without_eval_or_train_facts_claims_nothing(tmp_path):
    config, _ = make_run(tmp_path, push={"hardware": None, "cost_per_hour_usd": None})
    card = render_model_card(load_config(config), REPO, report=None, train_done=None, prompt_suffix=None)
    assert "Not evaluated" in card
    assert "%" not in card.split("## Evaluation")[1].split("## Training")[0]
    assert "| hardware | unknown |" in card and "| training time | unknown |" in card and "| cost | unknown |" in card
    assert "| optimizer steps | not measured |" in card
    assert 'text.index("@@SQL@@")' in card  # no checked prefix: the safe recipe


def test_card_shows_the_precision_train_recorded(tmp_path):
    config, _ = make_run(tmp_path)
    done = {**TRAIN_DONE, "precision": "bf16_kahan", "weights_dtype": "bfloat16", "compute_dtype": "bfloat16 autocast",
            "optimizer": "AdamW with Kahan summation (torch-optimi)"}
    card = render_model_card(load_config(config, ["merge.dtype=float16"]), REPO, report=REPORT, train_done=done,
                             prompt_suffix="\n")
    assert ("| precision | `bf16_kahan`: trainable weights bfloat16, compute bfloat16 autocast, AdamW with Kahan "
            "summation (torch-optimi); merged weights published in float16 |") in card


def test_card_for_an_adapter_and_for_a_local_base(tmp_path):
    config, _ = make_run(tmp_path, push={"artifact": "adapter"})
    cfg = load_config(config, ["model.name_or_path=tiny", "data.source=synthetic"])
    card = render_model_card(cfg, REPO, report=REPORT, train_done=TRAIN_DONE, prompt_suffix="")
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and "peft" in meta["tags"]
    assert "base_model" not in meta  # "tiny" is no Hub id: no invented base_model
    assert meta["datasets"] == ["b-mc2/sql-create-context"]  # the dataset the report measured
    assert "AutoPeftModelForCausalLM" in card and "prompt +=" not in card


def test_trained_prompt_suffix():
    tokens = {"bos_token": "<s>", "eos_token": "</s>"}
    assert trained_prompt_suffix(NO_NEWLINE_TEMPLATE, tokens) == "\n"
    assert trained_prompt_suffix(TINYLLAMA_TEMPLATE, tokens) == ""  # as transformers renders it: "<|assistant|>\n"
    assert trained_prompt_suffix(CHATML_TEMPLATE, tokens) == ""
    assert trained_prompt_suffix("{{ raise_exception('no') }}", tokens) is None
    assert trained_prompt_suffix("{% for", tokens) is None


@pytest.mark.slow
def test_card_prompt_recipe_gives_the_trained_prefix_of_the_real_tinyllama_tokenizer():
    """The prefix check, rendered without transformers, agrees with jobs.lib.chat.render_prompt on the real tokenizer."""
    from transformers import AutoTokenizer

    from jobs.lib.chat import render_prompt
    from jobs.lib.card import read_chat_template
    from tests.conftest import shared_path

    folder = shared_path("tokenizers", "tinyllama-1.1b-chat")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    suffix = trained_prompt_suffix(*read_chat_template(folder))
    assert suffix is not None
    context, question = "CREATE TABLE head (age INTEGER)", "How many heads are older than 56?"
    messages = [{"role": "system", "content": context}, {"role": "user", "content": question}]
    generation = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert generation + suffix == render_prompt(tokenizer, context, question)


# ---------------------------------------------------------------- the job against the fake Hub


def test_dry_run_lists_files_and_sizes_without_token_or_network(workdir, hub, push_here):
    config, root = make_run(workdir)
    result = push_here(config, "push.dry_run=true", token=None)
    assert result.returncode == 0, result.stderr
    assert "push.gates passed (merged: SQL-only 99.0%, execution accuracy 81.0% on 300 test examples)" in result.stdout
    assert "dry run: " in result.stdout and f"would go to {REPO} (private)" in result.stdout
    for path in ("README.md", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                 "eval/report.json", "logs/train.log", "run/train.done"):
        assert re.search(rf"\d+(\.\d)? (B|KB)\s+{re.escape(path)}\s", result.stdout), path
    assert "logs/push.log" not in result.stdout
    assert (root / "push" / "README.md").is_file() and not (root / "merged" / "README.md").exists()
    assert not (root / "push.done").exists() and hub.requests == []


def test_push_uploads_everything_and_a_rerun_commits_only_what_changed(workdir, hub):
    config, root = make_run(workdir)
    before = tree_digest(root)
    result = push(workdir, config, hub.url)
    assert result.returncode == 0, result.stderr
    repo = hub.repo(REPO)
    assert repo.private
    expected = {".gitattributes", "README.md", "model.safetensors", "config.json", "generation_config.json",
                "chat_template.jinja", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "eval/report.json", "eval/report.md", "eval/predictions.jsonl", "eval/accuracy.png",
                "logs/train.log", "logs/metrics.jsonl", "logs/push.config.yaml", "run/config.resolved.yaml",
                "run/data/manifest.json", "run/prep.done", "run/train.done", "run/merge.done", "run/eval.done"}
    assert set(repo.files) == expected  # not logs/push.log: this job's own log, still being written
    for path in expected - {".gitattributes", "README.md"}:
        local = root / ("merged/" + path if "/" not in path else path.removeprefix("run/"))
        assert repo.files[path].content == local.read_bytes(), path
    assert repo.files["model.safetensors"].lfs and repo.files["eval/accuracy.png"].lfs  # through the LFS protocol
    card = repo.files["README.md"].content.decode()
    assert card == (root / "push" / "README.md").read_text() and hub.validated_readmes == [card]
    assert front_matter(card)["datasets"] == ["b-mc2/sql-create-context"]
    assert "| fine-tuned (merged) — **this repo** | 99.0% | 73.5% | 81.0% |" in card
    assert tree_digest(root) == before  # pushing only reads the artifacts
    done = json.loads((root / "push.done").read_text())
    assert done["repo_id"] == REPO and done["commit"] == repo.sha and done["evaluated"] is True
    assert done["new_commit"] is True and f"pushed {len(expected) - 1} files" in result.stdout

    # the same content again: nothing uploaded, no commit (huggingface_hub leaves out what the Hub already has)
    commits, lfs_puts = len(repo.commits), hub.count("PUT", "^/_lfs/")
    again = push(workdir, config, hub.url)
    assert again.returncode == 0, again.stderr
    assert len(repo.commits) == commits and hub.count("POST", "/commit/") == 1
    assert hub.count("PUT", "^/_lfs/") == lfs_puts
    assert "nothing uploaded, no new commit" in again.stdout
    assert json.loads((root / "push.done").read_text())["new_commit"] is False

    # one file changed: one commit, changing just that file (huggingface_hub 0.x, the cu118 set, sends the unchanged
    # small files along again; the weights, stored by LFS, are never sent twice)
    (root / "eval" / "report.md").write_text("# Eval report, revised\n")
    third = push(workdir, config, hub.url)
    assert third.returncode == 0, third.stderr
    assert len(repo.commits) == commits + 1 and repo.commits[-1].paths == ["eval/report.md"]
    assert hub.count("PUT", "^/_lfs/") == lfs_puts


def test_adapter_push_replaces_peft_readme_with_the_card(workdir, hub, push_here):
    config, root = make_run(workdir, push={"artifact": "adapter"})
    result = push_here(config)
    assert result.returncode == 0, result.stderr
    files = hub.repo(REPO).files
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "model.safetensors" not in files
    assert front_matter(files["README.md"].content.decode())["library_name"] == "peft"
    assert (root / "adapter" / "README.md").read_text().startswith("---\nlibrary_name: peft")  # untouched


def test_unfinished_eval_is_refused_unless_gates_are_off_then_pushes_as_not_evaluated(workdir, hub, push_here):
    config, root = make_run(workdir, evaluated=False)
    result = push_here(config)
    assert result.returncode == 2 and hub.requests == [] and not (root / "push.done").exists()
    assert result.stderr.strip().splitlines()[-1] == (
        "t2s push: error: not publishing run r1: the run has no finished eval (`t2s eval`) (not evaluated): improve "
        "the model or change push.gates, or --set push.enforce_gates=false to publish it anyway")
    result = push_here(config, "push.enforce_gates=false")
    assert result.returncode == 0, result.stderr
    files = hub.repo(REPO).files
    assert not any(p.startswith("eval/") for p in files)
    assert "Not evaluated" in files["README.md"].content.decode()
    assert "eval did not finish" in result.stderr
    assert "publishing although the run has no finished eval" in result.stderr


def _report(merged: dict | None = None, base: dict | None = None, **rest) -> dict:
    results = {"base": {**REPORT["results"]["base"], **(base or {})},
               "merged": {**REPORT["results"]["merged"], **(merged or {})}}
    return {**REPORT, "results": results, **rest}


@pytest.mark.parametrize("report, gates, artifact, expected", [
    (_report(), {}, "merged", []),
    (_report(), {}, "adapter", []),  # no adapter row: the merged row is the same model
    (_report(merged={"sql_only": 0.006, "execution_accuracy": 0.004}), {}, "merged",
     ["SQL-only 0.6% < push.gates.min_sql_only 90.0%",
      "execution accuracy 0.4% < push.gates.min_execution_accuracy 50.0%",
      "execution accuracy 0.4% < the base model's 1.0% (push.gates.not_worse_than_base)"]),
    (_report(merged={"execution_accuracy": 0.6}, base={"execution_accuracy": 0.62}), {}, "merged",
     ["execution accuracy 60.0% < the base model's 62.0% (push.gates.not_worse_than_base)"]),
    (_report(merged={"execution_accuracy": 0.6}, base={"execution_accuracy": 0.62}),
     {"not_worse_than_base": False}, "merged", []),
    (_report(merged={"execution_accuracy": 0.81}), {"min_execution_accuracy": 0.9}, "merged",
     ["execution accuracy 81.0% < push.gates.min_execution_accuracy 90.0%"]),
    ({**REPORT, "results": {"merged": REPORT["results"]["merged"]}}, {}, "merged",
     ["no base model score to compare with (add base to eval.models, or set push.gates.not_worse_than_base=false)"]),
    ({**REPORT, "results": {"base": REPORT["results"]["base"]}}, {}, "merged",
     ["the eval report has no score for the fine-tuned model (add merged to eval.models)"]),
    (_report(merged={"sql_only": "high"}), {}, "merged",
     ["the eval report's merged row lacks SQL-only or execution accuracy (rerun `t2s eval --force`)"]),
    (None, {}, "merged", ["the run has no finished eval (`t2s eval`)"]),
])
def test_push_gates(report, gates, artifact, expected):
    failures, measured = gate_failures(report, PushGates(**gates), artifact)
    assert failures == expected
    if report is not None and not failures:
        assert measured.startswith("merged: SQL-only 99.0%, execution accuracy ")


def test_a_model_below_the_gates_is_not_published_unless_told_to(workdir, hub, push_here):
    broken = _report(merged={"sql_only": 0.006, "execution_accuracy": 0.004})
    config, root = make_run(workdir)
    (root / "eval" / "report.json").write_text(json.dumps(broken))
    for sets in ((), ("push.dry_run=true",)):  # a dry run says what a real push would do
        result = push_here(config, *sets)
        assert result.returncode == 2 and hub.requests == [] and not (root / "push.done").exists()
        line = result.stderr.strip().splitlines()[-1]
        assert line.startswith("t2s push: error: not publishing run r1: SQL-only 0.6% < push.gates.min_sql_only 90.0%; "
                               "execution accuracy 0.4% < push.gates.min_execution_accuracy 50.0%; execution accuracy "
                               "0.4% < the base model's 1.0% (push.gates.not_worse_than_base) (merged: SQL-only 0.6%, "
                               "execution accuracy 0.4% on 300 test examples)")
        assert "--set push.enforce_gates=false" in line
    result = push_here(config, "push.enforce_gates=false")
    assert result.returncode == 0, result.stderr
    assert "note: publishing although SQL-only 0.6% < push.gates.min_sql_only" in result.stderr
    assert "model.safetensors" in hub.repo(REPO).files


def test_unfinished_merge_is_a_one_line_error(workdir, hub, push_here):
    config, root = make_run(workdir)
    (root / "merge.done").unlink()
    result = push_here(config)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"t2s push: error: push needs a finished merge in {root} (no merge.done): run `t2s merge` first")
    assert hub.requests == []


@pytest.mark.parametrize("token, sets, message", [
    (None, (), "HF_TOKEN is not set"),
    (TOKEN, ("push.repo_id=null",), "push.repo_id is not set"),
    (TOKEN, ("push.repo_id=datasets/alice/x",), "is not 'owner/name' of a model repo"),
])
def test_config_and_token_errors_before_any_request(workdir, hub, push_here, token, sets, message):
    config, _ = make_run(workdir)
    result = push_here(config, *sets, token=token)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1]
    assert hub.requests == []


def test_rejected_token_401(workdir, hub, push_here):
    config, root = make_run(workdir)
    result = push_here(config, token=OTHER_TOKEN)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "t2s push: error: the Hub rejected HF_TOKEN (401 Unauthorized) while creating the repo: put a valid token "
        "with write access in HF_TOKEN (environment or .env); tokens are made at https://huggingface.co/settings/tokens")
    assert not (root / "push.done").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_no_write_access_403(workdir, hub, push_here, existing):
    if existing:  # a public repo of someone else: readable, not writable, so the refusal comes at upload
        hub.add_repo("bob/models", private=False)
    config, root = make_run(workdir, push={"repo_id": "bob/models"})
    before = tree_digest(root)
    result = push_here(config)
    assert result.returncode == 2
    step = "uploading and committing" if existing else "creating the repo"
    assert result.stderr.strip().splitlines()[-1] == (
        f"t2s push: error: HF_TOKEN may not write to bob/models (403 Forbidden) while {step}: use a token with "
        "write access to the 'bob' namespace, or change push.repo_id")
    assert tree_digest(root) == before


def test_name_taken_by_a_dataset_repo(workdir, hub, push_here):
    hub.add_repo(REPO, repo_type="dataset")
    config, _ = make_run(workdir)
    result = push_here(config)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"t2s push: error: push.repo_id {REPO} is a dataset repo on the Hub, not a model repo: choose another push.repo_id")
    assert hub.repo(REPO) is None and hub.count("POST", "/commit/") == 0


def test_unreachable_hub_is_retried_then_a_clear_error(workdir, push_here):
    config, root = make_run(workdir)
    before = tree_digest(root)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    result = push_here(config, endpoint=endpoint)  # push.retries: 2 → 3 attempts
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("push: creating the repo failed")] == [
        f"push: creating the repo failed ({REFUSED}); retry 1/2 in 0.01 s",
        f"push: creating the repo failed ({REFUSED}); retry 2/2 in 0.02 s"]
    assert lines[-1] == (f"t2s push: error: could not reach the Hub at {endpoint} while creating the repo after 3 "
                         f"attempt(s) ({REFUSED}): check the network (or HF_ENDPOINT / proxy settings) and rerun "
                         "`t2s push`; local files are untouched")
    assert tree_digest(root) == before and not (root / "push.done").exists()


def test_transient_hub_errors_are_retried(workdir, hub, push_here):
    hub.fail("POST", "^/api/repos/create$", 503, times=1)
    hub.fail("POST", "^/api/repos/create$", "drop", times=1)
    # the commit lands but its answer is lost: the retry compares again, finds nothing left, commits nothing
    hub.fail("POST", "/commit/", "lose_answer", times=1)
    config, root = make_run(workdir)
    result = push_here(config)
    assert result.returncode == 0, result.stderr
    assert "creating the repo failed (HTTP 503); retry 1/2" in result.stderr
    assert f"creating the repo failed ({DROPPED}); retry 2/2" in result.stderr
    assert f"uploading failed ({DROPPED}); retry 1/2" in result.stderr
    assert hub.count("POST", "^/api/repos/create$") == 3 and hub.count("POST", "/commit/") == 1
    assert len(hub.repo(REPO).commits) == 2  # the repo's first commit and ours, once
    assert json.loads((root / "push.done").read_text())["commit"] == hub.repo(REPO).sha


def test_hub_failing_every_attempt_is_a_clear_error(workdir, hub, push_here):
    hub.fail("POST", "^/api/repos/create$", 502, times=10)
    config, root = make_run(workdir, push={"retries": 1})
    result = push_here(config)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "t2s push: error: the Hub answered HTTP 502 while creating the repo, 2 attempt(s) in a row: try `t2s push` "
        "again later (local files are untouched; unchanged files are not sent twice)")
    assert hub.count("POST", "^/api/repos/create$") == 2 and not (root / "push.done").exists()


def test_stalled_request_times_out_and_fails_clearly(workdir, hub, push_here):
    hub.fail("POST", "^/api/repos/create$", "stall", times=5, stall_s=1.0)
    config, _ = make_run(workdir, push={"retries": 1})
    result = push_here(config, T2S_PUSH_TIMEOUT_S="0.2")
    assert result.returncode == 2
    assert "while creating the repo after 2 attempt(s) (ReadTimeout)" in result.stderr.strip().splitlines()[-1]


def test_token_never_printed_logged_or_written(workdir, hub):
    """A push, a rejected token and an unreachable Hub, each in its own run directory: neither token is in any
    output, in any file under the work folder (run dirs, the card's staging folder, HOME, HF_HOME, TMPDIR),
    or in anything that reached the repo."""
    scenarios = {"ok": (TOKEN, hub.url), "unauthorized": (OTHER_TOKEN, hub.url),
                 "offline": (TOKEN, f"http://127.0.0.1:{closed_port()}")}
    outputs = []
    for name, (token, endpoint) in scenarios.items():
        config, _ = make_run(workdir / name)
        outputs.append(push(workdir, config, endpoint, token=token))
    assert [r.returncode for r in outputs] == [0, 2, 2]
    secrets = (TOKEN, OTHER_TOKEN)
    for result in outputs:
        for secret in secrets:
            assert secret not in result.stdout and secret not in result.stderr
    written = [p for p in workdir.rglob("*") if p.is_file()]
    assert sum(p.name == "push.log" for p in written) == 3 and sum(p.name == "README.md" for p in written) >= 3
    for path in written:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, path
    for repo in hub.repos.values():
        for path, stored in repo.files.items():
            assert TOKEN.encode() not in stored.content, path


@pytest.mark.parametrize("report, gates, expected", [
    (_report(split="train"), {}, ["the eval ran on the train split, which the model was trained on: evaluate a "
                                  "held-out split (eval.split: test or validation)"]),
    ({k: v for k, v in _report().items() if k != "split"}, {},
     ["the eval report does not say which split it ran on (rerun `t2s eval --force`)"]),
    # issue 31: 15.0% on 100 rows became 66.7% on eval.max_examples=3 and cleared the 50% gate
    (_report(n_examples=3, merged={"n": 3, "gold_error": 0, "execution_accuracy": 0.667}), {},
     ["execution accuracy rests on 3 rows < push.gates.min_rows 100 (evaluate more rows: raise or unset "
      "eval.max_examples)"]),
    (_report(merged={"n": 102, "gold_error": 2, "build_error": 1}), {},
     ["execution accuracy rests on 99 rows < push.gates.min_rows 100 (evaluate more rows: raise or unset "
      "eval.max_examples)"]),
    (_report(merged={"n": 3, "gold_error": 0}), {"min_rows": 3}, []),
    (_report(merged={"n": "300"}), {}, ["the eval report does not say how many rows it scored (rerun `t2s eval "
                                        "--force`)"]),
])
def test_push_gates_refuse_what_the_rows_cannot_support(report, gates, expected):
    assert gate_failures(report, PushGates(**gates), "merged")[0] == expected


def test_the_card_never_calls_the_train_split_held_out(tmp_path):
    config, _ = make_run(tmp_path)
    card = render_model_card(load_config(config), REPO, report=_report(split="train"), train_done=TRAIN_DONE,
                             prompt_suffix="\n")
    assert "On the held-out" not in card and "On the **train** split (300 examples)" in card
    assert card.count("held-out") == 1  # only in the warning that these are not held-out rows
    assert "These are the rows the model was trained on, not held-out ones" in card
    held_out = render_model_card(load_config(config), REPO, report=REPORT, train_done=TRAIN_DONE, prompt_suffix="\n")
    assert "On the held-out **test** split (300 examples)" in held_out


def test_push_refuses_an_eval_on_the_train_split_in_one_line(workdir, hub, push_here):
    config, root = make_run(workdir)
    (root / "eval" / "report.json").write_text(json.dumps(_report(split="train")))
    result = push_here(config, "push.dry_run=true")
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and hub.requests == [] and not (root / "push.done").exists()
    assert line.startswith("t2s push: error: not publishing run r1: the eval ran on the train split") and \
        "on 300 train examples" in line
