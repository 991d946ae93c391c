"""Config: defaults + file + overrides, validated up front, one clear line per problem."""

import pytest

from jobs.lib.config import Config, load_config, secret
from jobs.lib.errors import T2SError
from tests.conftest import t2s


def test_defaults_file_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_id: r1\ntrain:\n  learning_rate: 1e-4\n  lora: {r: 4}\n")
    cfg = load_config(path, ["train.epochs=3", "eval.models=[merged]", "push.private=false"])
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.lora.r == 4 and cfg.train.lora.alpha == Config().train.lora.alpha
    assert cfg.train.epochs == 3.0 and cfg.eval.models == ["merged"] and cfg.push.private is False
    assert str(cfg.run_dir) == "runs/r1"


@pytest.mark.parametrize("text, overrides, expected", [
    ("train:\n  learning_rat: 0.1\n", [], "unknown config key 'train.learning_rat'"),
    ("train:\n  epochs: many\n", [], "config key 'train.epochs'"),
    ("train: [1, 2\n", [], "not valid YAML at line"),
    ("- a\n- b\n", [], "must be a mapping"),
    ("", ["train.method=sgd"], "config key 'train.method'"),
    ("", ["nonsense"], "is not key=value"),
    ("run_id: 'a b'\n", [], "config key 'run_id'"),
    ("", ["train.method=qlora", "model.gguf_file=m.gguf"], "train.method qlora cannot load the GGUF file m.gguf"),
    ("", ["train.lora.r=0"], "config key 'train.lora.r'"),
    ("", ["train.lora.alpha=-2"], "config key 'train.lora.alpha'"),
    ("", ["train.learning_rate=nan"], "config key 'train.learning_rate'"),
    ("", ["train.learning_rate=1e400"], "config key 'train.learning_rate'"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, overrides, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(T2SError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        load_config(path, overrides)


def test_missing_config_file():
    with pytest.raises(T2SError, match="not found"):
        load_config("nowhere.yaml")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  sauce: x\n")
    result = t2s("prep", "--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "unknown config key 'data.sauce'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_secret_from_environment_then_dotenv(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("HF_TOKEN=from-dotenv\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert secret("HF_TOKEN", env_file) == "from-dotenv"
    monkeypatch.setenv("HF_TOKEN", "from-env")
    assert secret("HF_TOKEN", env_file) == "from-env"
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    assert secret("RUNPOD_API_KEY", tmp_path / "absent.env") is None


def test_a_set_key_thousands_of_levels_deep_is_one_line(tmp_path):
    """Issue 31: a 3,000-level --set path overflowed the recursion limit (a traceback)."""
    deep = ".".join(["a"] * 3000) + "=1"
    with pytest.raises(T2SError, match=r"a config key is at most 8 levels deep \(e.g. train.lora.r\): fix the key"):
        load_config(None, [deep])
    result = t2s("prep", "--set", deep, "--set", f"runs_dir={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and len(result.stderr) < 300
    assert load_config(None, ["push.gates.min_rows=3"]).push.gates.min_rows == 3
    with pytest.raises(T2SError, match="config key 'push.gates.min_rows'"):
        load_config(None, ["push.gates.min_rows=0"])


def test_an_environment_variable_that_sets_a_config_key_says_so_and_the_run_records_it(monkeypatch, capsys):
    import yaml

    from jobs.lib.config import dump_config

    monkeypatch.setenv("T2S_DECODER", "Static")
    monkeypatch.setenv("T2S_PUSH_TIMEOUT_S", "12.5")
    monkeypatch.delenv("T2S_PUSH_BACKOFF_S", raising=False)
    cfg = load_config(None, ["eval.decoder=dynamic", "push.timeout_s=60"])  # the environment wins, visibly
    assert (cfg.eval.decoder, cfg.push.timeout_s, cfg.push.backoff_s) == ("static", 12.5, 2.0)
    said = capsys.readouterr().err.splitlines()
    assert said == ["note: T2S_DECODER=static from the environment sets eval.decoder",
                    "note: T2S_PUSH_TIMEOUT_S=12.5 from the environment sets push.timeout_s"]
    recorded = yaml.safe_load(dump_config(cfg))  # what logs/<job>.config.yaml holds
    assert recorded["eval"]["decoder"] == "static" and recorded["push"]["timeout_s"] == 12.5
    monkeypatch.setenv("T2S_DECODER", "turbo")
    with pytest.raises(T2SError, match=r"^T2S_DECODER='turbo' is not a decoder: use one of auto, cudagraph"):
        load_config(None)
    monkeypatch.delenv("T2S_DECODER")
    monkeypatch.setenv("T2S_PUSH_TIMEOUT_S", "-1")
    with pytest.raises(T2SError, match=r"^T2S_PUSH_TIMEOUT_S='-1' is not a number of seconds above 0"):
        load_config(None)
    monkeypatch.delenv("T2S_PUSH_TIMEOUT_S")
    capsys.readouterr()
    assert load_config(None, ["eval.decoder=compiled"]).eval.decoder == "compiled"
    assert capsys.readouterr().err == ""
    with pytest.raises(T2SError, match="eval.decoder"):
        load_config(None, ["eval.decoder=turbo"])
    with pytest.raises(T2SError, match="push.backoff_s"):
        load_config(None, ["push.backoff_s=0"])
