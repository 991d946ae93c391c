"""Reading an exported GGUF file back, and running it through llama.cpp, for `t2s export`'s checks and `t2s eval`'s
`gguf:<quant>` models.

A GGUF file is untrusted input to llama.cpp: a damaged one (or one whose vocabulary lacks a token llama.cpp looks up,
such as the newline byte) aborts the process instead of raising. So llama.cpp only ever runs in a worker process
(`python -m jobs.lib.gguf_check --worker`, llama-cpp-python), and a crash there is one line here. The read-back uses
gguf-py's reader, which raises Python errors on a damaged file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.lib.errors import T2SError, first_line

# ---------- read back (gguf-py) ----------


@dataclass(frozen=True)
class GGUFSummary:
    architecture: str
    tensor_count: int
    tensor_shapes: dict[str, tuple[int, ...]]  # GGUF's order: ne[0] first (a weight [out, in] reads (in, out))
    file_type: int | None
    tokens: list[str]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool | None
    chat_template: str | None
    block_count: int | None


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception:  # an old gguf-py without contents(), or a damaged field
        return None


def read_gguf(path: Path) -> GGUFSummary:
    """What the file says about itself, or one line when it is not a readable GGUF file (truncated, damaged)."""
    from gguf import GGUFReader

    if not path.is_file():
        raise T2SError(f"{path} does not exist: run `t2s export` (or check the path)")
    try:
        reader = GGUFReader(str(path))
        architecture = _field(reader, "general.architecture")
        summary = GGUFSummary(
            architecture=str(architecture),
            tensor_count=len(reader.tensors),
            tensor_shapes={t.name: tuple(int(n) for n in t.shape) for t in reader.tensors},
            file_type=_field(reader, "general.file_type"),
            tokens=list(_field(reader, "tokenizer.ggml.tokens") or []),
            bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
            eos_id=_field(reader, "tokenizer.ggml.eos_token_id"),
            eot_id=_field(reader, "tokenizer.ggml.eot_token_id"),
            add_bos=_field(reader, "tokenizer.ggml.add_bos_token"),
            chat_template=_field(reader, "tokenizer.chat_template"),
            block_count=_field(reader, f"{architecture}.block_count"),
        )
    except T2SError:
        raise
    except Exception as exc:  # gguf-py raises ValueError, struct / numpy / mmap errors on a damaged file
        raise T2SError(f"{path} is not a readable GGUF file ({first_line(exc, 120)}): it is truncated or damaged; "
                       "export it again (`t2s export --force`)") from None
    if architecture is None:
        raise T2SError(f"{path} has no general.architecture: it is not a model GGUF file; export it again")
    return summary


def expected_tensor_count(merged: Path) -> int:
    """The merged model's weight tensors (safetensors), as the converter writes them: one GGUF tensor each, rotary
    caches left out (llama.cpp computes them)."""
    from safetensors import safe_open

    names = set()
    for shard in sorted(merged.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            names |= {n for n in handle.keys() if not n.endswith("rotary_emb.inv_freq")}
    return len(names)


def read_back_problems(summary: GGUFSummary, *, architecture: str, tensors: int, layers: int, vocab: list[str],
                       chat_template: str, stop_ids: list[int], bos_id: int | None) -> list[str]:
    """What in the file differs from the merged model it was made from (empty: it reads back right). Pure."""
    problems = []
    if summary.architecture != architecture:
        problems.append(f"architecture {summary.architecture!r}, not {architecture!r}")
    if summary.tensor_count != tensors:
        problems.append(f"{summary.tensor_count} tensors, not the merged model's {tensors}")
    if summary.block_count is not None and summary.block_count != layers:
        problems.append(f"{summary.block_count} layers, not {layers}")
    embedding = summary.tensor_shapes.get("token_embd.weight")
    if embedding is None or embedding[-1] != len(vocab):
        problems.append(f"token embedding of shape {embedding}, not one row per token of {len(vocab)}")
    if summary.tokens != vocab:
        first = next((i for i, (a, b) in enumerate(zip(summary.tokens, vocab)) if a != b), min(len(summary.tokens),
                                                                                                len(vocab)))
        problems.append(f"a vocabulary of {len(summary.tokens)} tokens that differs from the tokenizer's "
                        f"({len(vocab)}) from id {first}")
    if summary.chat_template != chat_template:
        problems.append("a chat template that is not the tokenizer's")
    if bos_id is not None and summary.bos_id != bos_id:
        problems.append(f"BOS id {summary.bos_id}, not {bos_id}")
    end_of_turn = {summary.eos_id, summary.eot_id} - {None}
    if not set(stop_ids) & end_of_turn:
        problems.append(f"end-of-turn ids {sorted(end_of_turn)}, none of t2s's stop ids {stop_ids}")
    return problems


# ---------- llama.cpp, in a worker process ----------


def llama_cpp_available(python: str = sys.executable) -> str | None:
    """None when llama-cpp-python imports in `python`, else why not (one line)."""
    probe = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode == 0:
        return None
    return (probe.stderr.strip().splitlines() or ["llama_cpp does not import"])[-1][:160]


def describe_crash(returncode: int, stderr: str) -> str:
    """A worker's death, in words: the signal that killed it, or its exit code, and llama.cpp's last line."""
    if returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith(("llama_", "load"))]
    said = f": {lines[-1][:160]}" if lines else ""
    return how + said


def run_worker(request: dict, timeout_s: float) -> dict:
    """Runs one request in a fresh `python -m jobs.lib.gguf_check --worker` (llama.cpp never loads in this process);
    its JSON answer, or one line when llama.cpp crashed, hung or failed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "jobs.lib.gguf_check", "--worker"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise T2SError(f"llama.cpp did not finish with {request['path']} within {timeout_s:.0f}s: the file may be "
                       "damaged; export it again (`t2s export --force`)") from None
    answer = None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            try:
                answer = json.loads(line)
                break
            except ValueError:
                pass
    if done.returncode != 0 or answer is None:
        raise T2SError(f"llama.cpp could not run {request['path']} ({describe_crash(done.returncode, done.stderr)}): "
                       "the file is damaged or not a model this llama.cpp supports; export it again "
                       "(`t2s export --force`)")
    if answer.get("error"):
        raise T2SError(f"llama.cpp could not run {request['path']}: {answer['error']}")
    return answer


def llama_cpp_answers(path: Path, prompts: list[str], stop_ids: list[int], max_new_tokens: int,
                      threads: int | None = None, timeout_s: float = 3600) -> dict:
    """Greedy answers of the GGUF file at `path` through llama.cpp: {"answers": [{text, ids, ended, seconds}],
    "prompt_tokens": [[ids]], "bos_id", "eog": {stop id: whether llama.cpp ends a turn there}, "load_s"}."""
    request = {"path": str(path), "prompts": prompts, "stop_ids": stop_ids, "max_new_tokens": max_new_tokens,
               "threads": threads or os.cpu_count() or 1}
    return run_worker(request, timeout_s)


def quantize(source: Path, target: Path, quant: str, timeout_s: float = 7200) -> None:
    """llama.cpp's quantizer (llama_model_quantize), in a worker: `source` (an f16 GGUF) to `target` in `quant`."""
    run_worker({"quantize": True, "path": str(source), "target": str(target), "quant": quant,
                "threads": os.cpu_count() or 1}, timeout_s)


LLAMA_FTYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "f16": "LLAMA_FTYPE_MOSTLY_F16"}


def _worker_quantize(request: dict) -> dict:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_FTYPES[request["quant"]])
    params.nthread = int(request["threads"])
    status = llama_cpp.llama_model_quantize(request["path"].encode(), request["target"].encode(), params)
    return {"error": f"llama_model_quantize returned {status}"} if status != 0 else {"ok": True}


def _worker_generate(request: dict) -> dict:
    import time

    import llama_cpp

    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=request["path"], n_ctx=int(request.get("n_ctx", 2048)),
                          n_threads=request["threads"], n_threads_batch=request["threads"], verbose=False, seed=0)
    load_s = time.perf_counter() - started
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = set(request["stop_ids"])
    answers, prompt_tokens = [], []
    for prompt in request["prompts"]:
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        prompt_tokens.append(tokens)
        began, ids, ended = time.perf_counter(), [], False
        if len(tokens) + request["max_new_tokens"] > llm.n_ctx():
            answers.append({"text": "", "ids": [], "ended": False, "seconds": 0.0, "too_long": True})
            continue
        for token in llm.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            ids.append(int(token))
            if token in stops or llama_cpp.llama_vocab_is_eog(vocab, token):
                ended = True
                break
            if len(ids) >= request["max_new_tokens"]:
                break
        text = llm.detokenize(ids[:-1] if ended else ids).decode("utf-8", errors="replace").strip()
        answers.append({"text": text, "ids": ids, "ended": ended, "seconds": time.perf_counter() - began})
    return {"answers": answers, "prompt_tokens": prompt_tokens, "bos_id": llm.token_bos(), "load_s": load_s,
            "eog": {str(i): bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in request["stop_ids"]}}


def worker_main() -> None:
    """One request on stdin, one JSON line on stdout. A Python error is an {"error"} answer; an abort in llama.cpp
    kills this process, which the caller reports."""
    request = json.loads(sys.stdin.read())
    try:
        answer = _worker_quantize(request) if request.get("quantize") else _worker_generate(request)
    except Exception as exc:  # llama-cpp-python raises ValueError for a file it cannot load
        answer = {"error": first_line(exc, 200)}
    print(json.dumps(answer), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
