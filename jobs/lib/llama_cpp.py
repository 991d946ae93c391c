"""llama.cpp's tools for `t2s export`, as one pinned pair from one llama-cpp-python sdist: where the converter is and
whether it is the pinned one, running it (convert_hf_to_gguf.py with the gguf-py beside it) and reading its failures,
and what it must be given so that llama.cpp tokenizes prompts as t2s does (the SentencePiece model, the first word's
space)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from jobs.lib.config import Config
from jobs.lib.errors import T2SError
from jobs.lib.rundir import RunDir

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned pair: keep equal to LLAMA_CPP_PYTHON_VERSION in images/llama-cpp.sh


def supported_architectures(conversion_dir: Path) -> set[str]:
    """The HF architectures the converter registers (@ModelBase.register("...", ...) in conversion/*.py)."""
    found: set[str] = set()
    for source in conversion_dir.glob("*.py"):
        for args in re.findall(r"@\w+\.register\(([^)]*)\)", source.read_text(errors="replace")):
            found |= set(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
    return found


def converter_dir() -> Path:
    """llama.cpp's converter with its conversion/ package and gguf-py, from the pinned llama-cpp-python sdist."""
    return Path(os.environ.get("T2S_LLAMA_CPP_DIR") or Path(sys.prefix) / "share" / "t2s" / "llama.cpp")


def check_converter() -> Path:
    folder = converter_dir()
    how = ("install it with `make install` (it unpacks llama-cpp-python's sdist there) or use the t2s:train image, "
           "or point T2S_LLAMA_CPP_DIR at a folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/ from "
           f"llama-cpp-python {LLAMA_CPP_PYTHON}'s vendor/llama.cpp")
    if not (folder / "convert_hf_to_gguf.py").is_file() or not (folder / "gguf-py" / "gguf").is_dir():
        raise T2SError(f"llama.cpp's converter is not in {folder}: {how}")
    pinned = (folder / "VERSION").read_text().strip() if (folder / "VERSION").is_file() else None
    if pinned is not None and pinned != LLAMA_CPP_PYTHON:
        raise T2SError(f"the converter in {folder} is llama-cpp-python {pinned}'s, but t2s pins {LLAMA_CPP_PYTHON}: "
                       "rerun `make install` (or rebuild the image)")
    return folder


def check_llama_cpp() -> None:
    from jobs.lib.gguf_check import llama_cpp_available

    why = llama_cpp_available()
    if why is not None:
        raise T2SError(f"llama-cpp-python is not installed ({why}): q4_k_m and the llama.cpp checks need it; "
                       f"`make install` builds llama-cpp-python=={LLAMA_CPP_PYTHON} once into a cached wheel (or set "
                       "export.quant to f16 / q8_0 and export.llama_cpp_check: false)")


def convert(converter: Path, merged: Path, target: Path, outtype: str) -> None:
    """convert_hf_to_gguf.py in its own process, with the gguf-py beside it (it puts that first on its path)."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    done = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(merged), "--outfile",
                           str(target), "--outtype", outtype], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise T2SError(f"llama.cpp's converter failed on {merged}: {converter_failure(done.stderr)}")


def converter_failure(stderr: str) -> str:
    """The converter's traceback, in one line that says what to do."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    if "BPE pre-tokenizer was not recognized" in stderr:
        return ("its BPE pre-tokenizer is not one llama.cpp knows (llama.cpp recognizes a BPE tokenizer by a hash of "
                "how it splits a test text, so a tokenizer trained for this run, like the demo's tiny one, is never "
                "known): export a model whose tokenizer is a published one (e.g. TinyLlama's, SmolLM2's)")
    if "not supported" in last:
        return f"{last[:200]}: llama.cpp cannot convert this architecture"
    return last[:300]


def sentencepiece_model(cfg: Config, run: RunDir) -> Path | None:
    """The run's tokenizer's tokenizer.model (SentencePiece), if it has one: the model folder's, or the Hub cache's
    (never downloaded). transformers 5 saves a Llama tokenizer as tokenizer.json only, so merged/ lacks it."""
    from jobs.lib.models import tokenizer_path

    name = tokenizer_path(cfg, run)
    local = Path(name).expanduser() / "tokenizer.model"
    if local.is_file():
        return local
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name, "tokenizer.model", local_files_only=True))
    except Exception:  # not a Hub id, not cached, no such file: the converter uses tokenizer.json
        return None


def same_pieces(spm_file: Path, tokenizer) -> bool:
    """Whether the SentencePiece model has the tokenizer's vocabulary, piece for piece (added tokens may follow)."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor(model_file=str(spm_file))
    size = processor.get_piece_size()
    return size <= len(tokenizer) and [processor.id_to_piece(i) for i in range(size)] == \
        tokenizer.convert_ids_to_tokens(list(range(size)))


def spaces_only_the_first_word(tokenizer) -> bool:
    """A SentencePiece tokenizer that is not "legacy" (TinyLlama's: legacy false) puts "▁" before the prompt's first
    word only; llama.cpp (add_space_prefix) puts one after every special token too ("</s>\n" → </s> ▁ \n)."""
    eos = tokenizer.eos_token or ""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(f"{eos}\nA", add_special_tokens=False)["input_ids"])
    return len(pieces) > 1 and pieces[1] != "▁" and tokenizer.convert_ids_to_tokens(
        tokenizer("A", add_special_tokens=False)["input_ids"])[0].startswith("▁")


def conversion_input(cfg: Config, run: RunDir, staging: Path) -> tuple[Path, bool]:
    """What the converter reads, and whether prompts for llama.cpp start with a space. merged/, plus the tokenizer's
    tokenizer.model when merged/ lacks it: without it the converter builds a Llama vocabulary from tokenizer.json with
    scores that are not SentencePiece's, and llama.cpp then splits words otherwise than the model was trained on
    (TinyLlama's "INTEGER": ▁INT EG ER instead of ▁IN TE GER). For a non-legacy SentencePiece tokenizer the file gets
    add_space_prefix false and the prompt (the Modelfile's TEMPLATE) a leading space instead: the same tokens as t2s's."""
    from jobs.lib.models import load_tokenizer

    tokenizer = load_tokenizer(str(run.merged))
    has_spm = (run.merged / "tokenizer.model").is_file()
    spm_file = None if has_spm else sentencepiece_model(cfg, run)
    if spm_file is not None and not same_pieces(spm_file, tokenizer):
        spm_file = None
    leading_space = (has_spm or spm_file is not None) and spaces_only_the_first_word(tokenizer)
    if spm_file is None and not leading_space:
        return run.merged, False
    folder = staging / ".convert-input"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for entry in run.merged.iterdir():
        (folder / entry.name).symlink_to(entry.resolve())
    if spm_file is not None:
        shutil.copyfile(spm_file, folder / "tokenizer.model")
    if leading_space:
        settings = json.loads((run.merged / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").unlink()
        (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "add_prefix_space": False}))
    return folder, leading_space


def llama_cpp_prompt(prompt: str, bos_token: str | None, leading_space: bool) -> str:
    """jobs.chat's prompt as llama.cpp is given it (what the Modelfile's TEMPLATE renders): the same text, with a leading
    space where the export moved the tokenizer's first-word space into the prompt. llama.cpp adds a BOS exactly when
    t2s's tokenizer does (the converter carries add_bos_token over), so the text keeps whatever the chat template
    writes (SmolLM2's BOS, <|im_start|>, starts every turn); the checks compare the token ids and refuse a doubled
    BOS. (`bos_token`: kept for callers; the text is never cut.)"""
    return (" " if leading_space else "") + prompt
