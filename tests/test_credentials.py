"""jobs/lib/credentials.py exactly: which values are secrets (and which ordinary config values are not), redaction,
and what a machine knows as its secrets."""

from __future__ import annotations

import secrets as random
import string
from pathlib import Path

import pytest
import yaml

from jobs.lib.config import load_config
from jobs.lib.credentials import (find_secret, find_secret_in_config, is_secret_name, known_secrets, looks_random,
                              redacted_bytes, redactor)
from jobs.lib.errors import T2SError

ROOT = Path(__file__).resolve().parents[1]

ORDINARY = [  # values a config holds, which must never be taken for a secret
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-Q8_0.gguf",
    "Qwen/Qwen2.5-Coder-0.5B-Instruct", "b-mc2/sql-create-context", "NVIDIA H100 80GB HBM3", "2 × H100 (RunPod)",
    "ghcr.io/t2s/t2s:pipeline-cu12-0a1b2c3d4e5f60718293a4b5c6d7e8f901234567",
    "docker.io/me/t2s@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "/Users/JohnSmith2024/Projects/T2SExperiments/runs", "expandable_segments:True", "l4x2-qlora-2025-01-01T10-00",
    "550e8400e29b41d4a716446655440000", "ABCDEF0123456789ABCDEF0123456789ABCDEF01", "someone/t2s-runs", "agv6w2qcg7",
    "run_2025_01_01_lr2e-4_bs16_epochs3_r16_alpha32", "TinyLlamaChatFineTune2024v1RunNumber2",
    "ThisIsMyRunForTesting2024AgainAndAgain", "QwenCoder05BInstructLoraR16Alpha32Run1", "model.layers.0.self_attn.q_proj",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "hf_transfer", "hf_hub_download", "rpa_short",
]
SECRET_SHAPES = {
    "hf_" + "Ab3" * 12: "a Hugging Face token",
    "rpa_" + "X7y" * 14: "a RunPod API key",
    "ghp_" + "a1B" * 12: "a GitHub token",
    "AKIAIOSFODNN7EXAMPLE": "an AWS access key id",
    "7QK3ZP9X2M8VJ4HT6RWC1YBN5DLF0GSA": "a random-looking key",  # an old-style RunPod key
    "sk-proj-F0wAwaIINYNvDMbZoOlJLl3fZJZ207qc18Ref3bCaWWrprhZ": "a random-looking key",
}


@pytest.mark.parametrize("value", ORDINARY)
def test_ordinary_config_values_are_not_secrets(value):
    assert find_secret(value, known={}) is None


def test_every_shipped_config_loads_without_a_false_alarm():
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        assert find_secret_in_config(yaml.safe_load(config.read_text()), known={}) is None, config
        load_config(config)


@pytest.mark.parametrize("value, what", SECRET_SHAPES.items())
def test_tokens_are_known_by_their_shape_inside_any_text(value, what):
    assert find_secret(f"note: {value} (from the console)", known={}).what == what


def test_most_random_keys_are_caught_by_the_generic_rule():
    """A heuristic, tuned against false alarms: measured, not perfect (known values and shapes do the rest)."""
    alphabet = string.ascii_uppercase + string.digits
    upper = sum(looks_random("".join(random.choice(alphabet) for _ in range(32))) for _ in range(500))
    mixed = sum(looks_random("".join(random.choice(string.ascii_letters + string.digits) for _ in range(40)))
                for _ in range(500))
    assert upper >= 450 and mixed >= 300, (upper, mixed)


def test_secret_names_and_what_a_machine_knows(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN", "WANDB_API_KEY", "GITHUB_TOKEN",
                 "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "RUNPOD_API_KEY"):
        assert is_secret_name(name), name
    for name in ("TOKENIZERS_PARALLELISM", "HF_HUB_ENABLE_HF_TRANSFER", "PYTORCH_CUDA_ALLOC_CONF", "KEYBOARD",
                 "DS_ACCELERATOR", "NCCL_DEBUG"):
        assert not is_secret_name(name), name
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "from-the-environment")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # a switch, not a secret
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "token").write_text("hf_loggedInWithTheCli0123456789abcd\n")
    env = tmp_path / ".env"
    env.write_text("HF_TOKEN=from-dotenv-file\nREGISTRY=docker.io/me\nMY_SERVICE_SECRET=s3cr3t-value-here\n")
    known = known_secrets(env)
    assert known["from-the-environment"] == "HUGGING_FACE_HUB_TOKEN" and known["from-dotenv-file"] == "HF_TOKEN"
    assert known["s3cr3t-value-here"] == "MY_SERVICE_SECRET"
    assert known["hf_loggedInWithTheCli0123456789abcd"] == "the Hub login token"
    assert "1" not in known and "docker.io/me" not in known


def test_a_config_holding_a_secret_is_refused_naming_the_key_never_the_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_API_TOKEN", "plain-words-but-secret")
    config = tmp_path / "run.yaml"
    config.write_text("run_id: x\ninfra:\n  env:\n    NOTE: plain-words-but-secret\n")
    with pytest.raises(T2SError) as refused:
        load_config(config)
    assert str(refused.value).startswith("config key 'infra.env.NOTE' in ")
    assert "holds the value of HF_API_TOKEN" in str(refused.value) and "plain-words" not in str(refused.value)
    token = "hf_" + "Zz9" * 12
    for overrides, where in ((["eval.models=[base, " + token + "]"], "config key 'eval.models[1]'"),
                             ([f"{token}=1"], "a top-level key name"), ([token], "--set '<secret>'"),
                             ([f"push.retries={token}"], "config key 'push.retries'")):
        with pytest.raises(T2SError) as refused:
            load_config(None, overrides)
        assert where in str(refused.value) and token not in str(refused.value)


def test_redaction_hides_known_values_whole_and_token_shapes_only(tmp_path):
    hide = redactor({"supersecretvalue-long": "HF_TOKEN", "supersecretvalue": "OTHER_TOKEN", "abc12345xyz": "the Hub login token"})
    text = "a supersecretvalue-long b supersecretvalue c abc12345xyz d hf_" + "Q1w" * 11 + " e 9f86d081884c7d659a2feaa0"
    assert hide(text) == "a <HF_TOKEN> b <OTHER_TOKEN> c <secret> d <secret> e 9f86d081884c7d659a2feaa0"
    log = tmp_path / "train.log"
    log.write_text("step 1 supersecretvalue-long\n")
    assert redacted_bytes(log, hide, {"supersecretvalue-long": "HF_TOKEN"}) == b"step 1 <HF_TOKEN>\n"
    clean = tmp_path / "clean.log"
    clean.write_text("step 1\n")
    assert redacted_bytes(clean, hide, {"supersecretvalue-long": "HF_TOKEN"}) is None
    weights = tmp_path / "events.out.tfevents"
    weights.write_bytes(b"\x00\xff\xfe" + b"supersecretvalue-long" + b"\x00")
    with pytest.raises(ValueError, match="holds the value of HF_TOKEN and is not text"):
        redacted_bytes(weights, hide, {"supersecretvalue-long": "HF_TOKEN"})
