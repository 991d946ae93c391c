"""t2s export: GGUF files by llama.cpp's converter and quantizer, read back and checked against the merged model.

The model is the tiny Llama with TinyLlama's real tokenizer (../shared/tokenizers): a SentencePiece vocabulary the
converter knows. (The demo's own tiny tokenizer is a byte-level BPE trained at run time, which llama.cpp's converter
refuses: test_a_tokenizer_trained_at_run_time_is_refused_with_why.)"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest

from jobs import export
from jobs.lib import llama_cpp
from jobs.lib import gguf_check
from jobs.lib.config import load_config
from jobs.lib.errors import T2SError
from tests.conftest import ROOT, shared_path, t2s, tiny_config, write_config

HAS_CONVERTER = (llama_cpp.converter_dir() / "convert_hf_to_gguf.py").is_file()
HAS_LLAMA_CPP = gguf_check.llama_cpp_available() is None
needs_converter = pytest.mark.skipif(not HAS_CONVERTER, reason=f"no llama.cpp converter in {llama_cpp.converter_dir()} "
                                     "(make install puts it there)")
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (make install "
                                     "builds it once into a cached wheel)")


# ---------- pure core ----------

def test_the_pinned_version_is_the_install_scripts():
    script = (ROOT / "images" / "llama-cpp.sh").read_text()
    assert re.search(r"^LLAMA_CPP_PYTHON_VERSION=(\S+)", script, re.M).group(1) == llama_cpp.LLAMA_CPP_PYTHON


def test_config_takes_one_quant_or_several_and_refuses_unknown_ones():
    assert load_config(None, ["export.quant=q8_0"]).export.quant == ["q8_0"]
    assert load_config(None, ["export.quant=[q4_k_m,f16]"]).export.quant == ["q4_k_m", "f16"]
    for bad, says in (("export.quant=q5_k", "'f16', 'q8_0' or 'q4_k_m'"), ("export.quant=[]", "at least 1"),
                      ("export.min_agreement.q8_0=1.5", "less than or equal to 1"), ("export.format=onnx", "gguf")):
        with pytest.raises(T2SError, match=re.escape(says)):
            load_config(None, [bad])
    assert export.quants_in_order(["q4_k_m", "f16", "q4_k_m"]) == ["f16", "q4_k_m"]


def test_modelfile_template_is_the_prompt_with_ollamas_fields():
    prompt = f"<|system|>\n{export._SYSTEM}</s>\n<|user|>\n{export._USER}</s>\n<|assistant|>\n"
    template = export.modelfile_template(prompt, "<s>")
    assert template == "<|system|>\n{{ .System }}</s>\n<|user|>\n{{ .Prompt }}</s>\n<|assistant|>\n"
    assert export.modelfile_template(prompt, "<s>", leading_space=True) == " " + template
    smollm = f"<|im_start|>system\n{export._SYSTEM}<|im_end|>\n<|im_start|>user\n{export._USER}<|im_end|>\n"
    assert export.modelfile_template(smollm, "<|im_start|>").startswith("<|im_start|>system\n{{ .System }}")
    with pytest.raises(T2SError, match="cannot hold"):
        export.modelfile_template("{{ x }}" + prompt, "<s>")
    with pytest.raises(T2SError, match="once each"):
        export.modelfile_template(prompt.replace(export._USER, ""), "<s>")


def test_agreement_and_the_first_disagreement():
    merged = [{"text": "SELECT 1", "ended": True}, {"text": "SELECT 2", "ended": True}]
    same_text_cut = [{"text": "SELECT 1", "ended": True}, {"text": "SELECT 2", "ended": False}]
    assert export.agreement(merged, merged) == 1.0 and export.first_disagreement(merged, merged) is None
    assert export.agreement(merged, same_text_cut) == 0.5 and export.first_disagreement(merged, same_text_cut) == 1
    line = export.describe_row(1, {"question": "q?"}, merged[1], same_text_cut[1], "q8_0")
    assert line == 'row 1 ("q?"): merged "SELECT 2", q8_0 "SELECT 2" (cut at max_new_tokens)'


def test_converter_failures_become_one_line_that_says_why():
    bpe = "Traceback...\nNotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()\n"
    assert "hash of how it splits a test text" in llama_cpp.converter_failure(bpe)
    assert llama_cpp.converter_failure("x\nNotImplementedError: Model Foo is not supported\n").endswith(
        "llama.cpp cannot convert this architecture")


def test_a_crash_is_described_by_its_signal():
    assert gguf_check.describe_crash(-6, "llama_model_load: x\nGGML_ASSERT(foo) failed\n") == \
        "killed by SIGABRT: GGML_ASSERT(foo) failed"
    assert gguf_check.describe_crash(3, "") == "exit code 3"


def test_read_back_problems_name_what_differs():
    summary = gguf_check.GGUFSummary(
        architecture="llama", tensor_count=21, tensor_shapes={"token_embd.weight": (128, 3)}, file_type=1,
        tokens=["<unk>", "<s>", "</s>"], bos_id=1, eos_id=2, eot_id=None, add_bos=True, chat_template="T",
        block_count=2)
    good = dict(architecture="llama", tensors=21, layers=2, vocab=["<unk>", "<s>", "</s>"], chat_template="T",
                stop_ids=[2], bos_id=1)
    assert gguf_check.read_back_problems(summary, **good) == []
    assert gguf_check.read_back_problems(summary, **{**good, "tensors": 22}) == ["21 tensors, not the merged "
                                                                                  "model's 22"]
    assert "none of t2s's stop ids [5]" in gguf_check.read_back_problems(summary, **{**good, "stop_ids": [5]})[0]
    assert "differs from the tokenizer's (3) from id 2" in gguf_check.read_back_problems(
        summary, **{**good, "vocab": ["<unk>", "<s>", "<eos>"]})[0]
    assert gguf_check.read_back_problems(summary, **{**good, "chat_template": "U"}) == [
        "a chat template that is not the tokenizer's"]


@needs_converter
def test_the_converter_supports_llama():
    known = llama_cpp.supported_architectures(llama_cpp.converter_dir() / "conversion")
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= known
    assert "GPT2LMHeadModel" in known and "NoSuchForCausalLM" not in known


# ---------- the job on the tiny model ----------

@pytest.fixture(scope="module")
def merged_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama with TinyLlama's real tokenizer, prepared, trained a few steps and merged (once per module)."""
    from jobs.lib import tiny

    if not HAS_CONVERTER:
        pytest.skip(f"no llama.cpp converter in {llama_cpp.converter_dir()}")
    base_dir = tmp_path_factory.mktemp("export")
    base = base_dir / "base"
    tiny.save_tiny_base_with_tokenizer(base, shared_path("tokenizers", "tinyllama-1.1b-chat"))
    # A 4-step model answers with loops ("WHERE WHERE ...") whose near-ties can fall either way in another runtime
    # after a dozen tokens: the agreement is recorded and asserted to be high, not the shipped 95%.
    config = write_config(base_dir / "config.yaml", tiny_config(
        base_dir / "runs", model={"name_or_path": str(base)}, merge={"verify": False},
        train={"max_steps": 4}, export={"check_rows": 6, "max_new_tokens": 16, "quant": ["f16", "q8_0"],
                                        "llama_cpp_check": HAS_LLAMA_CPP,
                                        "min_agreement": {"f16": 0.6, "q8_0": 0.6}}))
    for job in ("prep", "train", "merge"):
        result = t2s(job, "--config", str(config))
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return base_dir / "runs" / "t", config


def test_export_before_merge_is_one_line(copy_run):
    run, config = copy_run("unmerged")
    result = t2s("export", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "export needs a finished merge" in result.stderr and "run `t2s merge` first" in result.stderr


def test_an_unknown_quant_is_one_line(copy_run):
    run, config = copy_run("quant")
    result = t2s("export", "--config", str(config), "--set", "export.quant=q3_k")
    assert result.returncode == 2 and "config key 'export.quant.0' in --set export.quant" in result.stderr


@pytest.mark.slow
@needs_converter
def test_an_architecture_the_converter_lacks_is_one_line(merged_run, tmp_path):
    run, config = merged_run
    other = tmp_path / "runs" / "t"
    shutil.copytree(run, other)
    settings = json.loads((other / "merged" / "config.json").read_text())
    (other / "merged" / "config.json").write_text(json.dumps({**settings, "architectures": ["NoSuchForCausalLM"]}))
    cfg = tiny_config(tmp_path / "runs", model={"name_or_path": str(config.parent / "base")})
    result = t2s("export", "--config", str(write_config(tmp_path / "c.yaml", cfg)))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not support the architecture NoSuchForCausalLM" in result.stderr


@pytest.mark.slow
@needs_converter
def test_export_f16_and_q8_0_read_back_and_answer_as_the_merged_model(merged_run):
    run, config = merged_run
    result = t2s("export", "--config", str(config))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = run / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["Modelfile", "t.f16.gguf", "t.q8_0.gguf"]
    done = json.loads((run / "export.done").read_text())
    assert done["quants"] == ["f16", "q8_0"] and done["llama_cpp_python"] == llama_cpp.LLAMA_CPP_PYTHON
    assert done["checks"]["f16"]["transformers"] == "6/6 answers identical"
    summary = gguf_check.read_gguf(folder / "t.f16.gguf")
    assert (summary.architecture, summary.tensor_count, summary.block_count) == ("llama", 21, 2)
    assert summary.tokens[:3] == ["<unk>", "<s>", "</s>"] and len(summary.tokens) == 32000
    assert summary.chat_template == (run / "merged" / "chat_template.jinja").read_text()
    assert done["sizes"]["q8_0"] < 0.6 * done["sizes"]["f16"]
    if HAS_LLAMA_CPP:
        for quant in ("f16", "q8_0"):
            assert done["checks"][quant]["llama_cpp"]["agreement"] >= 0.6
        assert done["leading_space"] is True  # TinyLlama's tokenizer is non-legacy SentencePiece

    # a rerun skips; --force redoes it
    again = t2s("export", "--config", str(config))
    assert again.returncode == 0 and "export: already finished" in again.stdout
    before = (run / "export.done").stat().st_mtime_ns
    forced = t2s("export", "--config", str(config), "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (run / "export.done").stat().st_mtime_ns > before and "converting to q8_0" in forced.stdout


@pytest.mark.slow
@needs_converter
def test_the_modelfile_renders_the_prompt_t2s_gives_the_model(merged_run):
    from jobs.lib.chat import render_prompt, stop_token_ids
    from jobs.lib.models import load_tokenizer

    run, config = merged_run
    if not (run / "export" / "Modelfile").is_file():
        assert t2s("export", "--config", str(config)).returncode == 0
    text = (run / "export" / "Modelfile").read_text()
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1)
    stops = re.findall(r'^PARAMETER stop (".*")$', text, re.M)
    assert re.search(r"^FROM \./t\.q8_0\.gguf$", text, re.M)
    tokenizer = load_tokenizer(str(run / "merged"))
    schema, question = "CREATE TABLE head (age INTEGER)", "How many heads are older than 56?"
    rendered = export.render_modelfile_template(template, schema, question)
    assert [json.loads(s) for s in stops] == tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))
    # llama.cpp adds the one BOS itself; the leading space stands for the one the tokenizer puts before the first word
    assert rendered == " " + render_prompt(tokenizer, schema, question)


@pytest.mark.slow
@needs_converter
@needs_llama_cpp
def test_llama_cpp_tokenizes_the_modelfile_prompt_with_exactly_one_bos(merged_run):
    from jobs.lib.chat import render_prompt, stop_token_ids
    from jobs.lib.models import load_tokenizer

    run, config = merged_run
    if not (run / "export.done").is_file():
        assert t2s("export", "--config", str(config)).returncode == 0
    tokenizer = load_tokenizer(str(run / "merged"))
    template = re.search(r'^TEMPLATE """(.*?)"""$', (run / "export" / "Modelfile").read_text(), re.M | re.S).group(1)
    prompt = export.render_modelfile_template(template, "CREATE TABLE t (a INTEGER)", "How many rows?")
    found = gguf_check.llama_cpp_answers(run / "export" / "t.q8_0.gguf", [prompt], stop_token_ids(tokenizer), 4)
    tokens = found["prompt_tokens"][0]
    assert tokens.count(found["bos_id"]) == 1 and tokens[0] == found["bos_id"]
    assert tokens == tokenizer(render_prompt(tokenizer, "CREATE TABLE t (a INTEGER)", "How many rows?"))["input_ids"]
    assert all(found["eog"].values())


@pytest.mark.slow
@needs_converter
@needs_llama_cpp
def test_q4_k_m_by_the_quantizer(merged_run, tmp_path):
    run, config = merged_run
    other = tmp_path / "runs" / "t"
    shutil.copytree(run, other)
    cfg = tiny_config(tmp_path / "runs", model={"name_or_path": str(config.parent / "base")},
                      export={"quant": "q4_k_m", "check_rows": 6, "max_new_tokens": 16,
                              "min_agreement": {"q4_k_m": 0.0}})  # a 4-step model's near-ties: agreement reported
    result = t2s("export", "--config", str(write_config(tmp_path / "c.yaml", cfg)), "--force")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in (other / "export").iterdir()) == ["Modelfile", "t.q4_k_m.gguf"]
    summary = gguf_check.read_gguf(other / "export" / "t.q4_k_m.gguf")
    assert summary.file_type == 15 and summary.tensor_count == 21  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    done = json.loads((other / "export.done").read_text())
    assert 0 <= done["checks"]["q4_k_m"]["llama_cpp"]["agreement"] <= 1


# ---------- damaged files ----------

@pytest.mark.slow
@needs_converter
def test_a_truncated_or_corrupted_gguf_is_refused_with_one_line(merged_run, tmp_path):
    run, config = merged_run
    if not (run / "export.done").is_file():
        assert t2s("export", "--config", str(config)).returncode == 0
    good = (run / "export" / "t.q8_0.gguf").read_bytes()
    truncated, corrupted = tmp_path / "truncated.gguf", tmp_path / "corrupted.gguf"
    truncated.write_bytes(good[: len(good) // 3])
    corrupted.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 64 + good[72:])
    for path in (truncated, corrupted):
        with pytest.raises(T2SError, match=r"is not a readable GGUF file \(.*\): it is truncated or damaged"):
            gguf_check.read_gguf(path)


def test_a_worker_that_llama_cpp_aborts_is_one_line_and_t2s_goes_on(tmp_path, monkeypatch):
    """llama.cpp aborts on some files (GGML_ASSERT: SIGABRT) instead of raising. The issue's example, a vocabulary
    without the newline byte token, no longer aborts llama-cpp-python 0.3.36 (it falls back to the pad id for an SPM
    vocabulary), so the worker here is one that dies as an abort does: the parent sees the same thing."""
    aborting = tmp_path / "python"
    aborting.write_text("#!/bin/sh\ncat >/dev/null\necho 'GGML_ASSERT(hparams.n_vocab > 0) failed' >&2\nkill -ABRT $$\n")
    aborting.chmod(0o755)
    monkeypatch.setattr(gguf_check, "sys", type("FakeSys", (), {"executable": str(aborting)}))
    with pytest.raises(T2SError) as caught:
        gguf_check.llama_cpp_answers(tmp_path / "model.gguf", ["x"], [2], 4)
    assert str(caught.value) == (f"llama.cpp could not run {tmp_path / 'model.gguf'} (killed by SIGABRT: "
                                 "GGML_ASSERT(hparams.n_vocab > 0) failed): the file is damaged or not a model this "
                                 "llama.cpp supports; export it again (`t2s export --force`)")


@pytest.mark.slow
@needs_converter
@needs_llama_cpp
def test_a_file_llama_cpp_cannot_load_is_one_line(merged_run, tmp_path):
    """A file gguf-py reads but llama.cpp refuses (no attention heads): its error, in one line, in a worker."""
    import gguf

    run, config = merged_run
    if not (run / "export.done").is_file():
        assert t2s("export", "--config", str(config)).returncode == 0
    reader = gguf.GGUFReader(str(run / "export" / "t.q8_0.gguf"))
    broken = tmp_path / "no-heads.gguf"
    writer = gguf.GGUFWriter(str(broken), arch="llama")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            kind = field.types[0]
            writer.add_key_value(name, 0 if name == "llama.attention.head_count" else field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_check.read_gguf(broken).tensor_count == 21
    with pytest.raises(T2SError, match=r"^llama.cpp could not run .*no-heads.gguf: Failed to load model from file"):
        gguf_check.llama_cpp_answers(broken, ["x"], [2], 4)


@pytest.mark.slow
def test_a_tokenizer_trained_at_run_time_is_refused_with_why(copy_run):
    """The demo's tiny tokenizer: a byte-level BPE of its own, whose pre-tokenizer llama.cpp cannot recognize."""
    if not HAS_CONVERTER:
        pytest.skip("no llama.cpp converter")
    run, config = copy_run("bpe")
    for job in ("train", "merge"):
        assert t2s(job, "--config", str(config), "--set", "merge.verify=false").returncode == 0
    result = t2s("export", "--config", str(config), "--set", "export.quant=f16",
                 "--set", "export.llama_cpp_check=false")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "BPE pre-tokenizer is not one llama.cpp knows" in result.stderr


# ---------- eval and push of the exported files ----------

@pytest.mark.slow
@needs_converter
@needs_llama_cpp
def test_eval_scores_an_exported_file_and_push_uploads_the_files_with_how_to_run_them(merged_run):
    run, config = merged_run
    if not (run / "export.done").is_file():
        assert t2s("export", "--config", str(config)).returncode == 0
    result = t2s("eval", "--config", str(config), "--set", "eval.models=[merged,gguf:q8_0]", "--set",
                 "eval.max_examples=4", "--set", "eval.decoding=greedy")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((run / "eval" / "report.json").read_text())
    assert set(report["results"]) == {"merged", "gguf:q8_0"} and report["results"]["gguf:q8_0"]["n"] == 4
    assert report["results"]["gguf:q8_0"]["decoder"] == "llama.cpp"
    missing = t2s("eval", "--config", str(config), "--set", "eval.models=[gguf:q4_k_m]", "--force")
    assert missing.returncode == 2 and "add q4_k_m to export.quant" in missing.stderr

    pushed = t2s("push", "--config", str(config), "--set", "push.artifacts=[gguf]", "--set",
                 "push.enforce_gates=false")
    assert pushed.returncode == 0, pushed.stdout[-2000:] + pushed.stderr[-2000:]
    for name in ("gguf/t.f16.gguf", "gguf/t.q8_0.gguf", "gguf/Modelfile"):
        assert name in pushed.stdout
    card = (run / "push" / "README.md").read_text()
    assert "ollama create t2s-test -f Modelfile" in card and "llama-cli -m t.q8_0.gguf" in card
