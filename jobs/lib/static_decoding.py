"""Greedy decoding with a pre-allocated (static) KV cache; on a GPU each decode step is replayed as a CUDA graph.

Why: transformers' `generate` with its dynamic cache spends ~26-40 ms of host time per decoding step on a GPU
(bench/RESULTS.md §4-5), whatever the model's size or the batch's. Here a decode step only reads and writes tensors
whose addresses never change (the cache, the next input token and its position, the attention mask, the output
tokens), so it is captured once per (batch, cache length) bucket as a CUDA graph and then replayed: one host call per
token for the whole model. No compiler runs (no torch.compile, no inductor): a capture costs two eager steps and the
capture itself, a fraction of a second, so a fresh `t2s ask` process does not pay a compilation.

The answers are transformers' greedy ones: the same left-padded prompts, position ids counted from each row's first
real token, the argmax of the last logits, a finished row fed the pad token. Off CUDA the same steps run eagerly
(backend "static"): that is how the CPU tests compare it token for token with `generate`.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass

import torch

WARMUP_STEPS = 2  # eager decode steps (on a side stream) before a bucket's capture, as CUDA graphs require
BATCH_STEP = 64  # batches are padded to a power of two up to this, then to a multiple of it
LENGTH_STEP = 128  # cache lengths are multiples of this
FEW_ROWS = 8  # at most this many rows: the cache is at least MIN_LENGTH_FEW_ROWS long
MIN_LENGTH_FEW_ROWS = 512  # one bucket then covers most single questions: one capture per `t2s ask` process
MAX_STOP_IDS = 8  # slots for the ids that end an answer (eos, end of turn): a captured step reads a fixed shape
CACHE_SHARE_OF_GPU = 0.4  # caches of all buckets together stay below this share of the GPU's memory

# generation_config settings that change greedy answers and that this loop does not apply: with any of them set,
# the model is decoded by transformers' generate instead. (Sampling settings do nothing when do_sample=False.)
UNSUPPORTED_OPTIONS = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "min_length": 0,
    "min_new_tokens": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
    "forced_decoder_ids": None, "renormalize_logits": False,
}


# ---------- pure core ----------

def batch_bucket(rows: int) -> int:
    """Rows a batch is padded to: a power of two up to 64, then a multiple of 64 (few shapes, little waste)."""
    if rows <= BATCH_STEP:
        return 1 << (rows - 1).bit_length()
    return -(-rows // BATCH_STEP) * BATCH_STEP


def length_bucket(tokens: int, rows: int) -> int:
    """Cache length for `tokens` (longest prompt + new tokens) in a batch of `rows`."""
    length = -(-tokens // LENGTH_STEP) * LENGTH_STEP
    return max(length, MIN_LENGTH_FEW_ROWS) if rows <= FEW_ROWS else length


def prefill_mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """[rows, 1, prompt, length] bool: a real token sees itself and the real tokens before it, as transformers' mask
    does; a pad token sees only itself (a softmax over no keys would give NaN, which masked keys would then carry)."""
    rows, prompt = attention_mask.shape
    device = attention_mask.device
    keys = torch.zeros(rows, length, dtype=torch.bool, device=device)
    keys[:, :prompt] = attention_mask.bool()
    queries, columns = torch.arange(prompt, device=device)[:, None], torch.arange(length, device=device)[None, :]
    return ((columns <= queries) & keys[:, None, :] | (columns == queries))[:, None]


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position counted from its row's first real token (left padding), as generate counts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def unsupported_options(generation_config) -> list[str]:
    """The generation_config settings that would change greedy answers and that this loop does not apply."""
    return [name for name, neutral in UNSUPPORTED_OPTIONS.items()
            if getattr(generation_config, name, neutral) not in (neutral, None, [], 0, 1.0, False)]


def full_attention_only(config) -> bool:
    """Whether every layer attends to the whole sequence: a sliding window would need another cache and mask."""
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return all(kind == "full_attention" for kind in layer_types) and not sliding


# ---------- attention for one new token ----------

PACKED_SDPA = "t2s_sdpa_packed_gqa"  # the name it is registered under with transformers' AttentionInterface


def sdpa_packed_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' SDPA attention, except for one new token a row: the query heads that share a key/value head
    become that head's queries, so each head of the cache is read once; transformers copies the keys and values
    for each query head instead (repeat_kv), moving the whole cache several times a step. Same as transformers 5.2x
    does itself (pack_gqa); 4.x and 5.1x do not."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, new_tokens, dim = query.shape
    groups = heads // key.shape[1]
    if new_tokens != 1 or groups == 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    packed = query.reshape(rows, key.shape[1], groups, dim)  # query head h reads key/value head h // groups
    output = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=attention_mask,
                                                              scale=scaling)
    return output.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def packed_gqa_attention(model):
    """The model's SDPA layers use sdpa_packed_gqa while inside (a CUDA graph keeps what its capture used)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, sdpa_packed_gqa)  # idempotent: a process-wide name -> function map
    config = base_model(model).config
    before = config._attn_implementation
    config._attn_implementation = PACKED_SDPA
    try:
        yield
    finally:
        config._attn_implementation = before


# ---------- the decoder ----------

@dataclass
class DecoderInfo:
    """What a model's decoder did so far in this process."""
    backend: str  # "dynamic" (transformers' generate), "static" (static cache, eager steps) or "cudagraph"
    compile_s: float = 0.0  # seconds of CUDA graph captures with their eager warm-up steps (and torch.compile)
    graphs: int = 0  # (batch, cache length) buckets captured
    fallback: str | None = None  # why the faster backend was given up, when it was


class Bucket:
    """The fixed tensors of one (rows, length) shape: a StaticCache and the decode step's inputs and outputs."""

    def __init__(self, model, rows: int, length: int):
        from transformers import StaticCache

        device, dtype = model.device, model.dtype
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        # transformers 5 sizes the cache from the first update (the prefill) and ignores the extra arguments;
        # 4.x allocates it here from them
        self.cache = StaticCache(config=config, max_batch_size=rows, max_cache_len=length, device=device, dtype=dtype)
        self.rows, self.length = rows, length
        self.cache_bytes = (2 * config.num_hidden_layers * rows * length * dtype.itemsize
                            * getattr(config, "num_key_value_heads", config.num_attention_heads)
                            * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads))
        self.input_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)  # the token the next step reads
        self.position_ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=device)  # where that token goes in the cache
        self.mask = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device=device)  # keys the next token sees
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.all_finished = torch.zeros((), dtype=torch.bool, device=device)
        self.tokens = torch.zeros(rows, length, dtype=torch.long, device=device)  # generated ids at their positions
        self.stop_ids = torch.full((MAX_STOP_IDS,), -1, dtype=torch.long, device=device)  # -1: an unused slot
        self.pad = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None
        self.eager_steps = 0


def forward_logits(model, **inputs) -> torch.Tensor:
    """The model's next-token logits [rows, vocabulary]: the function that "compiled" hands to torch.compile (the
    model is an argument, not a closure, so that a decoder keeps no reference to its model)."""
    return model(**inputs).logits[:, -1]


class StaticDecoder:
    """Greedy decoding of one model with static caches. backend: "static" (eager steps), "cudagraph" (steps replayed
    as CUDA graphs) or "compiled" (the decode step's forward compiled by torch.compile, replayed as CUDA graphs on a
    GPU: fewer, fused kernels, for a compilation of tens of seconds per shape bucket)."""

    def __init__(self, model, backend: str):
        self.use_graphs = backend == "cudagraph" or (backend == "compiled" and model.device.type == "cuda")
        self.compiled_forward = torch.compile(forward_logits) if backend == "compiled" else None
        self.info = DecoderInfo(backend)
        self.buckets: dict[tuple[int, int], Bucket] = {}  # in order of last use
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None  # one memory pool for all the graphs
        # two pinned flags and events, used in turn: whether every row had ended, read without stalling the GPU
        self.flags = [torch.zeros((), dtype=torch.bool, pin_memory=True) for _ in range(2)] if self.use_graphs else []
        self.events = [torch.cuda.Event() for _ in range(2)] if self.use_graphs else []
        self.flag_turn = 0
        forward = inspect.signature(type(base_model(model)).forward).parameters
        self.cache_argument = "cache" if "cache" in forward else "past_key_values"  # renamed in transformers 5.2x
        self.takes_cache_position = "cache_position" in forward  # transformers 4.x writes the cache where it says
        self.takes_logits_to_keep = "logits_to_keep" in forward

    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 stop_ids: list[int], pad_token_id: int) -> torch.Tensor:
        """[rows, new tokens] greedy ids after the left-padded prompts, pad after the first of a row's stop_ids (eos,
        end of turn), up to max_new_tokens (fewer when every row has ended)."""
        if len(stop_ids) > MAX_STOP_IDS:
            raise ValueError(f"{len(stop_ids)} ids end an answer; the static decoder holds at most {MAX_STOP_IDS}")
        rows, prompt = input_ids.shape
        bucket = self.bucket(model, batch_bucket(rows), length_bucket(prompt + max_new_tokens, rows))
        extra = bucket.rows - rows  # rows that pad the batch to its bucket: finished from the start
        if extra:
            input_ids = torch.cat([input_ids, input_ids.new_full((extra, prompt), pad_token_id)])
            attention_mask = torch.cat([attention_mask, attention_mask.new_zeros(extra, prompt)])
        bucket.stop_ids.fill_(-1)
        bucket.stop_ids[:len(stop_ids)] = torch.tensor(stop_ids, dtype=torch.long)
        bucket.pad.fill_(pad_token_id)
        bucket.finished.copy_(torch.arange(bucket.rows, device=bucket.finished.device) >= rows)
        self.prefill(model, bucket, input_ids, attention_mask)
        generated = 1
        if self.use_graphs:
            # the next step is queued before the host learns whether the last one finished every row: the GPU never
            # waits on the host, and a step too many only writes pad tokens after every row's EOS
            flag = self.finished_flag(bucket)
            while generated < max_new_tokens:
                self.step(model, bucket)
                generated += 1
                previous, flag = flag, self.finished_flag(bucket)
                if previous():
                    break
        else:
            while generated < max_new_tokens and not bool(bucket.all_finished):
                self.step(model, bucket)
                generated += 1
        return bucket.tokens[:rows, prompt:prompt + generated].cpu()

    # ---------- steps ----------

    def call_model(self, model, bucket: Bucket, input_ids, mask, position_ids, cache_position, forward=forward_logits):
        kwargs = {self.cache_argument: bucket.cache, "use_cache": True}
        if self.takes_cache_position:
            kwargs["cache_position"] = cache_position
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with packed_gqa_attention(model):
            return forward(model, input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)

    def prefill(self, model, bucket: Bucket, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """The prompts into the cache (eager: their length varies), and the first new token."""
        prompt = input_ids.shape[1]
        bucket.cache.reset()
        positions = position_ids_for(attention_mask)
        cache_position = torch.arange(prompt, device=input_ids.device)
        logits = self.call_model(model, bucket, input_ids, prefill_mask(attention_mask, bucket.length), positions,
                                 cache_position)
        self.take(bucket, logits, torch.tensor([prompt - 1], device=input_ids.device))
        bucket.mask.zero_()
        bucket.mask[:, 0, 0, :prompt] = attention_mask.bool()
        bucket.position_ids.copy_(positions[:, -1:] + 1)
        bucket.cache_position.fill_(prompt)

    def decode_step(self, model, bucket: Bucket) -> None:
        """One token for every row, reading and writing only the bucket's tensors (so it can be a CUDA graph)."""
        bucket.mask.index_fill_(3, bucket.cache_position, True)  # the new token sees itself
        logits = self.call_model(model, bucket, bucket.input_ids, bucket.mask, bucket.position_ids,
                                 bucket.cache_position, self.compiled_forward or forward_logits)
        self.take(bucket, logits, bucket.cache_position)
        bucket.position_ids.add_(1)
        bucket.cache_position.add_(1)

    @staticmethod
    def take(bucket: Bucket, logits: torch.Tensor, position: torch.Tensor) -> None:
        """The greedy token after `position` (pad for a finished row), written to tokens and to the next input."""
        token = torch.where(bucket.finished, bucket.pad, logits.argmax(-1))
        bucket.tokens.index_copy_(1, position + 1, token[:, None])
        bucket.finished.logical_or_((token[:, None] == bucket.stop_ids).any(-1))
        torch.all(bucket.finished, out=bucket.all_finished)
        bucket.input_ids.copy_(token[:, None])

    def step(self, model, bucket: Bucket) -> None:
        if bucket.graph is not None:
            bucket.graph.replay()
            return
        started = time.perf_counter()
        if not self.use_graphs:
            self.decode_step(model, bucket)
            compiling = self.compiled_forward is not None and not bucket.eager_steps  # torch.compile, this shape
        elif bucket.eager_steps < WARMUP_STEPS:
            self.warmup_step(model, bucket)
            compiling = True
        else:
            bucket.graph = self.capture(lambda: self.decode_step(model, bucket))
            self.info.graphs += 1
            compiling = True
        bucket.eager_steps += 1
        if compiling:
            self.info.compile_s += time.perf_counter() - started
        if bucket.graph is not None:
            bucket.graph.replay()  # the step just captured (capturing records a step, it does not run it)

    def warmup_step(self, model, bucket: Bucket) -> None:
        """A real decode step, eager, on a side stream: what a capture needs first (cuBLAS workspaces, lazy inits)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.decode_step(model, bucket)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

    def capture(self, decode_step) -> torch.cuda.CUDAGraph:
        """`decode_step` recorded as a CUDA graph (not run), its temporaries in the decoder's memory pool."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            decode_step()
        return graph

    def finished_flag(self, bucket: Bucket):
        """A function that waits for the steps queued so far and says whether every row had ended by then."""
        flag, done = self.flags[self.flag_turn], self.events[self.flag_turn]
        self.flag_turn = 1 - self.flag_turn
        flag.copy_(bucket.all_finished, non_blocking=True)
        done.record()

        def read() -> bool:
            done.synchronize()
            return bool(flag)

        return read

    # ---------- buckets ----------

    def bucket(self, model, rows: int, length: int) -> Bucket:
        """The bucket of that shape, made (after freeing the least recently used ones over the memory share) when new."""
        key = (rows, length)
        if key in self.buckets:
            self.buckets[key] = self.buckets.pop(key)  # most recently used last
            return self.buckets[key]
        bucket = Bucket(model, rows, length)
        budget = cache_budget(model)
        while self.buckets and sum(b.cache_bytes for b in self.buckets.values()) + bucket.cache_bytes > budget:
            self.buckets.pop(next(iter(self.buckets)))  # its cache and graph are freed with it
        self.buckets[key] = bucket
        return bucket


def cache_budget(model) -> float:
    """Bytes the caches of all of a decoder's buckets may take: a share of the GPU's memory; no limit on a CPU."""
    if model.device.type != "cuda":
        return float("inf")
    return CACHE_SHARE_OF_GPU * torch.cuda.get_device_properties(model.device).total_memory


def base_model(model):
    """The transformers model under a peft wrapper (whose forward takes *args, **kwargs)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def why_not_static(model) -> str | None:
    """Why this model cannot use the static decoder, or None when it can."""
    config = base_model(model).config
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    if not full_attention_only(config):
        return "it has sliding-window attention"
    if config._attn_implementation != "sdpa":  # eager attention adds its mask (float), flash-attn takes none
        return f"its attention is {config._attn_implementation}, not sdpa"
    options = unsupported_options(getattr(model, "generation_config", None))
    if options:
        return f"its generation_config sets {', '.join(options)}"
    return None
