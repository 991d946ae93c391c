"""Loading tokenizers and models from a Hub id, a local folder, a GGUF file, or the built-in tiny model.

Every loader takes a local path as well as a Hub id (the Hub may be unreachable), and every failure to load
becomes one line naming what was asked for and how to fix it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from jobs.lib.config import Config, names_local_path
from jobs.lib.errors import T2SError, first_line
from jobs.lib.rundir import RunDir

TINY = "tiny"


def base_model_path(cfg: Config, run: RunDir) -> str:
    """Where the base model is: the config's path or id, or the run's own copy of the built-in tiny model."""
    return str(run.base) if cfg.model.name_or_path == TINY else cfg.model.name_or_path


def tokenizer_path(cfg: Config, run: RunDir) -> str:
    return cfg.model.tokenizer or base_model_path(cfg, run)


def load_run_tokenizer(cfg: Config, run: RunDir, folder: str | None = None):
    """The run's tokenizer: model.tokenizer, else the base model's own (from its GGUF file when it ships as one).
    `folder`: where the base model is, when not where it will be (prep builds the tiny model in a staging folder)."""
    gguf_file = cfg.model.gguf_file if not cfg.model.tokenizer else None
    return load_tokenizer(cfg.model.tokenizer or folder or base_model_path(cfg, run), gguf_file)


def check_source(name: str, what: str) -> None:
    if names_local_path(name) and not Path(name).expanduser().exists():
        raise T2SError(f"{what} path {name} does not exist: pass an existing folder or a Hub id like org/name")


def _load_error(what: str, name: str, exc: Exception) -> T2SError:
    return T2SError(
        f"could not load {what} '{name}' ({first_line(exc)}): pass a local folder, or a Hub id while the Hub is "
        "reachable"
    )


def load_tokenizer(name: str, gguf_file: str | None = None):
    from transformers import AutoTokenizer

    check_source(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf_file) if gguf_file else \
            AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # transformers raises OSError, ValueError, HF errors...: all mean "cannot load"
        raise _load_error("tokenizer", name, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    honour_non_legacy_spm(tokenizer)
    return tokenizer


def honour_non_legacy_spm(tokenizer) -> None:
    """transformers 4.x keeps a SentencePiece tokenizer.json's legacy normalizer even when the config says
    legacy: false (TinyLlama's), which puts a "▁" after every special token ("</s>\n" decodes as "</s> \n");
    5.x builds what the non-legacy conversion gives: no normalizer, a Metaspace that prefixes the first word only."""
    from tokenizers import normalizers, pre_tokenizers

    backend = getattr(tokenizer, "_tokenizer", None)  # a fast tokenizer's tokenizers.Tokenizer
    if getattr(tokenizer, "legacy", None) is False and backend is not None and backend.pre_tokenizer is None \
            and isinstance(backend.normalizer, normalizers.Sequence):
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)


def gpu_has_bf16() -> bool:
    """Whether the GPU computes bf16 natively (Ampere and newer); torch >= 2.3 would also count emulation."""
    if not torch.cuda.is_available():
        return False
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 (the cu118 set) counts native support only
        return torch.cuda.is_bf16_supported()


def default_device() -> str:
    """Where models run: the GPU when there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str) -> torch.dtype:
    if requested == "auto":
        return torch.bfloat16 if gpu_has_bf16() else torch.float32
    return getattr(torch, requested)


def pick_attention(requested: str) -> str:
    """flash-attn 2 when installed and on a GPU, SDPA otherwise; a forced choice that cannot work is an error."""
    from transformers.utils import is_torch_flex_attn_available

    has_flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not has_flash:
        raise T2SError("model.attn_implementation is flash_attention_2 but flash-attn is not installed "
                       "(or no GPU): install flash-attn or set model.attn_implementation: auto")
    if requested == "flex_attention" and not torch.cuda.is_available():
        raise T2SError("model.attn_implementation flex_attention needs a GPU (it has no CPU backward): "
                       "set model.attn_implementation: auto")
    if requested == "flex_attention" and not is_torch_flex_attn_available():
        raise T2SError(f"model.attn_implementation flex_attention needs torch >= 2.5 (this is {torch.__version__}, "
                       "as in the cu118 image): set model.attn_implementation: auto")
    if requested == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    return requested


def load_model(name: str, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa", **kwargs):
    from transformers import AutoModelForCausalLM, PretrainedConfig

    check_source(name, "model")
    # (torch < 2.2, the cu118 image's, has no cuDNN SDPA backend to turn off)
    if attn_implementation == "sdpa" and torch.cuda.is_available() and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        # cuDNN's SDPA builds a plan for every new sequence length: milliseconds of host time per layer call,
        # which made length-grouped training host-bound (2.2x slower; bench/RESULTS.md).
        torch.backends.cuda.enable_cudnn_sdp(False)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    # transformers < 4.56 names the argument torch_dtype
    extra["dtype" if hasattr(PretrainedConfig, "dtype") else "torch_dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn_implementation, **extra, **kwargs)
    except Exception as exc:
        raise _load_error("model", name, exc) from None
    if gguf_file:
        # transformers dequantizes GGUF weights to dense floats on load but still marks the model quantized,
        # which would forbid training it in full.
        model.is_quantized, model.hf_quantizer = False, None
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def load_run_model(cfg: Config, run: RunDir, which: str):
    """(model, tokenizer) of a run: its base model, base + its LoRA adapter, or its merged model."""
    dtype = pick_dtype(cfg.model.dtype)
    if which == "merged":
        return load_model(str(run.merged), dtype=dtype), load_tokenizer(str(run.merged))
    if which == "adapter" and run.trained() != "adapter":
        raise T2SError(f"{run.adapter} holds a full fine-tune, not a LoRA adapter: evaluate it as merged "
                       "(`t2s merge`, then eval.models: [merged])")
    model = load_model(base_model_path(cfg, run), gguf_file=cfg.model.gguf_file, dtype=dtype)
    tokenizer = load_run_tokenizer(cfg, run)
    if which == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(run.trained_model()))
    return model, tokenizer
