"""What libraries print into a job's log, cut to what a person reading it needs (a pod's live stream is for people):
warnings once per process, no notice that a kernel t2s never uses is missing, and no progress bars when the output
is not a terminal (a log file, a pod's stream), where training's own line per logging interval says how far it is.

`quiet_library_output()` runs first in every t2s process (the CLI, and each training worker); the environment it sets
(PYTHONWARNINGS, TQDM_DISABLE) reaches the training workers that `accelerate launch` starts, before their imports.
"""

from __future__ import annotations

import logging
import os
import warnings

# bitsandbytes (0.49 on CPUs with AVX512-BF16) logs this on every import when the optional `kernels` package is missing;
# t2s never runs 4-bit matmuls on a CPU, so the notice says nothing about a t2s run.
# transformers warns at every generate that passes max_new_tokens to a model whose generation config has a max_length
# (TinyLlama's says 2048; a GGUF file's context length too): t2s always passes max_new_tokens, which takes precedence.
_NOTICES = {"bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
            "transformers.generation.utils": ("Both `max_new_tokens`",)}
# Libraries warn about their own deprecations each step and each rank; once per process is enough to see them.
_ONCE = (FutureWarning, UserWarning)


class _DropNotices(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_library_output(stream=None) -> None:
    """Drops the notices above, shows each warning once, and, given the `stream` the output goes to (the CLI's
    stderr), turns progress bars off unless it is a terminal (a training worker's output is always a pipe: it keeps
    what the CLI decided). Call before the libraries are imported (bitsandbytes logs its notice on import)."""
    for name, prefixes in _NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(prefixes))
    for category in _ONCE:
        warnings.filterwarnings("once", category=category)
    if "PYTHONWARNINGS" not in os.environ:  # the workers: from their start, so import-time warnings too
        os.environ["PYTHONWARNINGS"] = ",".join(f"once::{c.__name__}" for c in _ONCE)
    if stream is not None and not _is_terminal(stream):
        os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it (4.66+); the workers inherit it


def bars_off() -> bool:
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def one_line_per_log(trainer) -> None:
    """Without bars, the Trainer's own printing of each log dict (ProgressCallback / PrinterCallback) only repeats
    training's line (jobs.train's callback): removed, so that a log has one line per logging interval."""
    if not bars_off():
        return
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for callback in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(callback)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False
