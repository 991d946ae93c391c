"""jobs.lib.generate and jobs.lib.static_decoding: the static-cache decoder gives transformers' greedy answers token for token.

On a CPU the static decoder runs its steps eagerly (the CUDA graphs replay the very same step on a GPU), in fp32,
with the built-in tiny Llama: batches with left padding, rows padded up to a bucket, rows ending at EOS mid-batch.
"""

from __future__ import annotations

import json

import pytest
import torch

from jobs.lib import generate, static_decoding, tiny
from jobs.lib.chat import render_prompt
from jobs.lib.errors import T2SError
from jobs.lib.generate import generate_batched
from jobs.lib.synthetic import synthetic_rows
from tests.conftest import shared_path


# ---------- pure core ----------

def test_batches_and_lengths_are_padded_to_few_buckets():
    assert [static_decoding.batch_bucket(n) for n in (1, 2, 3, 5, 33, 64, 65, 128, 1090)] == \
        [1, 2, 4, 8, 64, 64, 128, 128, 1152]
    assert static_decoding.length_bucket(100, rows=1) == 512  # a few rows: one bucket for most questions
    assert static_decoding.length_bucket(600, rows=1) == 640
    assert static_decoding.length_bucket(100, rows=64) == 128
    assert static_decoding.length_bucket(129, rows=64) == 256


def test_prefill_mask_and_positions_follow_left_padding():
    attention = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = static_decoding.prefill_mask(attention, length=6)
    assert mask.shape == (2, 1, 4, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0],  # a pad token sees only itself
                                         [0, 1, 0, 0, 0, 0],
                                         [0, 0, 1, 0, 0, 0],  # the first real token: itself, no pads
                                         [0, 0, 1, 1, 0, 0]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                         [1, 1, 1, 1, 0, 0]]
    assert static_decoding.position_ids_for(attention).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


def test_generation_settings_the_loop_does_not_apply_are_named():
    from transformers import GenerationConfig

    assert static_decoding.unsupported_options(GenerationConfig()) == []
    assert static_decoding.unsupported_options(GenerationConfig(temperature=0.7, top_p=0.9)) == []  # sampling: unused
    assert static_decoding.unsupported_options(GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=3)) == \
        ["repetition_penalty", "no_repeat_ngram_size"]


def test_packed_gqa_attention_is_sdpa_over_repeated_keys():
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    query, key, value = torch.randn(3, 6, 1, 8), torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    mask = torch.rand(3, 1, 1, 10) > 0.3
    mask[:, :, :, 0] = True
    output, _ = static_decoding.sdpa_packed_gqa(SimpleNamespace(num_key_value_groups=3, is_causal=True), query, key,
                                                value, mask, scaling=0.3)
    expected = torch.nn.functional.scaled_dot_product_attention(query, repeat_kv(key, 3), repeat_kv(value, 3),
                                                                attn_mask=mask, scale=0.3).transpose(1, 2)
    assert output.shape == (3, 1, 6, 8)
    torch.testing.assert_close(output, expected)


# ---------- the tiny model, both decoders ----------

@pytest.fixture(scope="module")
def tiny_model():
    rows = synthetic_rows(300, seed=7)
    tokenizer = tiny.build_tokenizer([r["context"] + " " + r["question"] + " " + r["answer"] for r in rows])
    model = tiny.build_model(len(tokenizer), seed=3).eval()
    # prompts of several lengths (left padding within each batch), as eval renders them
    prompts = [render_prompt(tokenizer, r["context"], r["question"]) for r in synthetic_rows(23, seed=11)]
    return model, tokenizer, prompts


def with_eos(tokenizer, token_id: int):
    """The tokenizer with `token_id` as its end of turn: the random model then ends rows at different steps."""
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(token_id)
    return tokenizer


def often_generated_token(model, tokenizer, prompts: list[str]) -> int:
    """A token that some answers contain and others do not, at different steps: EOS mid-batch once it is EOS."""
    tokenizer.padding_side = "left"
    inputs = tokenizer.pad({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]}, return_tensors="pt")
    with torch.inference_mode():
        new = generate.generate_dynamic(model, inputs, 20, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    rows_with = {token: {row for row in range(len(prompts)) if token in new[row].tolist()}
                 for token in set(new.flatten().tolist()) - set(tokenizer.all_special_ids)}
    return max((t for t, rows in rows_with.items() if len(rows) < len(prompts)), key=lambda t: len(rows_with[t]))


@pytest.mark.parametrize("batch_size", [1, *(pytest.param(n, marks=pytest.mark.slow) for n in (5, 8))])  # 1: fast lane
def test_static_decoder_answers_token_for_token_as_transformers_generate(tiny_model, batch_size):
    model, tokenizer, prompts = tiny_model
    original_eos = tokenizer.eos_token
    try:
        with_eos(tokenizer, often_generated_token(model, tokenizer, prompts))
        reference = generate_batched(model, tokenizer, prompts, batch_size, 20, decoder="dynamic")
        static = generate_batched(model, tokenizer, prompts, batch_size, 20, decoder="static")
    finally:
        tokenizer.eos_token = original_eos
    assert [(g.text, g.new_tokens, g.ended_at_eos) for g in static] == \
        [(g.text, g.new_tokens, g.ended_at_eos) for g in reference]
    ended = [g.new_tokens for g in reference if g.ended_at_eos]
    assert ended and len(ended) < len(prompts) and len(set(ended)) > 1  # rows end mid-batch, at different steps
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 3  # batches hold prompts of several lengths


def test_static_decoder_stops_at_the_end_of_turn_when_the_tokenizer_names_another_eos(tiny_model):
    """As transformers 5.17 reads SmolLM2's GGUF: eos is one token, the chat template ends a turn with another. The
    model is made to write the end-of-turn token where it wrote a common token (their output rows swapped), so rows
    end at it mid-batch; a decoder that stopped at eos alone would run every row to max_new_tokens."""
    import copy

    from jobs.lib.chat import stop_token_ids

    model, tokenizer, prompts = tiny_model
    tokenizer = copy.deepcopy(tokenizer)
    common = often_generated_token(model, tokenizer, prompts)
    end_of_turn = tokenizer.convert_tokens_to_ids("</s>")
    tokenizer.chat_template = tiny.TINYLLAMA_CHAT_TEMPLATE.replace("+ eos_token", "+ '</s>'")
    tokenizer.eos_token = "<s>"
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<s>"), end_of_turn]
    swapped = tiny.build_model(len(tokenizer), seed=3).eval()
    with torch.no_grad():
        head = swapped.lm_head.weight
        head[[common, end_of_turn]] = head[[end_of_turn, common]].clone()
    prompts = [render_prompt(tokenizer, r["context"], r["question"]) for r in synthetic_rows(23, seed=11)]
    reference = generate_batched(swapped, tokenizer, prompts, 8, 20, decoder="dynamic")
    static = generate_batched(swapped, tokenizer, prompts, 8, 20, decoder="static")
    assert [(g.text, g.new_tokens, g.ended_at_eos) for g in static] == \
        [(g.text, g.new_tokens, g.ended_at_eos) for g in reference]
    ended = [g.new_tokens for g in static if g.ended_at_eos]
    assert ended and len(ended) < len(prompts) and len(set(ended)) > 1  # at the end of turn, mid-batch
    # the decoder itself stops there (pad after it, as generate writes), not only generate_batched's bookkeeping
    tokenizer.padding_side = "left"
    inputs = tokenizer.pad({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]}, return_tensors="pt")
    with torch.inference_mode():
        expected = generate.generate_dynamic(swapped, inputs, 20, stop_token_ids(tokenizer), tokenizer.pad_token_id)
        raw = generate.decoder_for(swapped, "static").generate(swapped, inputs["input_ids"], inputs["attention_mask"],
                                                               20, stop_token_ids(tokenizer), tokenizer.pad_token_id)
    assert torch.equal(raw, expected)


class ReplayedStep:
    """A stand-in for a CUDA graph on a CPU: replaying runs the captured step again on the same tensors, which is
    what a graph does (same kernels, same addresses)."""

    def __init__(self, step):
        self.step, self.replays = step, 0

    def replay(self):
        self.replays += 1
        self.step()


def test_the_cuda_graph_loop_on_a_cpu_gives_the_same_answers(tiny_model, monkeypatch):
    """The cudagraph backend's own logic (warm-up steps, one capture per bucket, replays, the step queued before the
    previous one's all-finished flag is read), with a CPU stand-in for the graph, the side stream and the flag."""
    model, tokenizer, prompts = tiny_model
    fresh = tiny.build_model(len(tokenizer), seed=3).eval()
    decoder = generate.decoder_for(fresh, "static")
    decoder.use_graphs = True
    captured = []
    monkeypatch.setattr(decoder, "warmup_step", decoder.decode_step)
    monkeypatch.setattr(decoder, "capture", lambda step: captured.append(ReplayedStep(step)) or captured[-1])

    def finished_flag(bucket):  # the value when the step was queued, read later
        value = bool(bucket.all_finished)
        return lambda: value

    monkeypatch.setattr(decoder, "finished_flag", finished_flag)
    original_eos = tokenizer.eos_token
    try:
        with_eos(tokenizer, often_generated_token(model, tokenizer, prompts))
        reference = generate_batched(model, tokenizer, prompts, 5, 20, decoder="dynamic")
        graphed = generate_batched(fresh, tokenizer, prompts, 5, 20, decoder="static")
        again = generate_batched(fresh, tokenizer, prompts, 5, 20, decoder="static")  # every bucket captured now
    finally:
        tokenizer.eos_token = original_eos
    expected = [(g.text, g.new_tokens, g.ended_at_eos) for g in reference]
    assert [(g.text, g.new_tokens, g.ended_at_eos) for g in graphed] == expected
    assert [(g.text, g.new_tokens, g.ended_at_eos) for g in again] == expected
    assert len(captured) == len(decoder.buckets) == decoder.info.graphs == 2  # 5-row batches, then the 3 left
    assert all(step.replays > 10 for step in captured)


def test_buckets_and_their_caches_are_reused_across_batches_and_calls(tiny_model):
    _, tokenizer, prompts = tiny_model
    model = tiny.build_model(len(tokenizer), seed=3).eval()  # a decoder of its own
    generate_batched(model, tokenizer, prompts[:8], 4, 6, decoder="static")
    decoder = generate.decoder_for(model, "static")
    assert list(decoder.buckets) == [(4, 512)]
    cache = decoder.buckets[(4, 512)].cache
    generate_batched(model, tokenizer, prompts[8:11], 3, 9, decoder="static")  # 3 rows: padded to the 4-row bucket
    assert list(decoder.buckets) == [(4, 512)] and decoder.buckets[(4, 512)].cache is cache
    assert generate.decoding_info(model) == {"backend": "static", "compile_s": 0.0, "graphs": 0, "fallback": None}


def test_least_recently_used_buckets_are_freed_over_the_memory_budget(tiny_model, monkeypatch):
    _, tokenizer, prompts = tiny_model
    model = tiny.build_model(len(tokenizer), seed=3).eval()
    decoder = generate.decoder_for(model, "static")
    one_bucket = static_decoding.Bucket(model, 2, 512).cache_bytes
    monkeypatch.setattr(static_decoding, "cache_budget", lambda model: 2.4 * one_bucket)  # two 2-row caches fit
    for rows in (2, 1, 2, 4):  # buckets (2, 512), (1, 512), (2, 512) again, then (4, 512): twice the size
        generate_batched(model, tokenizer, prompts[:rows], rows, 4, decoder="static")
    assert list(decoder.buckets) == [(4, 512)]  # (1, 512), then (2, 512), made room
    generate_batched(model, tokenizer, prompts[:1], 1, 4, decoder="static")
    assert list(decoder.buckets) == [(1, 512)]


def test_a_failing_decoder_falls_back_with_one_line_and_the_same_answers(tiny_model, monkeypatch, capsys):
    model, tokenizer, prompts = tiny_model
    reference = generate_batched(model, tokenizer, prompts[:6], 3, 8, decoder="dynamic")
    fresh = tiny.build_model(len(tokenizer), seed=3).eval()  # the same weights, a decoder of its own

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(static_decoding.StaticDecoder, "generate", broken)
    answers = generate_batched(fresh, tokenizer, prompts[:6], 3, 8, decoder="static")
    assert [g.text for g in answers] == [g.text for g in reference]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fast decoding (static) is off for this model (operation not permitted when " \
        "stream is capturing); decoding with transformers' generate instead" in err
    assert generate.decoding_info(fresh)["fallback"] == "operation not permitted when stream is capturing"
    generate_batched(fresh, tokenizer, prompts[:6], 3, 8, decoder="static")  # stays on generate, says nothing more
    assert capsys.readouterr().err == ""


def test_settings_the_loop_does_not_apply_send_the_model_to_generate(tiny_model, capsys):
    model, tokenizer, prompts = tiny_model
    penalised = tiny.build_model(len(tokenizer), seed=3).eval()
    penalised.generation_config.repetition_penalty = 1.5
    answers = generate_batched(penalised, tokenizer, prompts[:4], 4, 12, decoder="static")
    assert "its generation_config sets repetition_penalty" in capsys.readouterr().err
    unpenalised = generate_batched(model, tokenizer, prompts[:4], 4, 12, decoder="dynamic")
    assert [g.text for g in answers] != [g.text for g in unpenalised]  # the penalty was applied, by generate


def test_models_the_static_decoder_does_not_take(tiny_model):
    model, tokenizer, prompts = tiny_model
    assert static_decoding.why_not_static(model) is None
    generate_batched(model, tokenizer, prompts[:2], 2, 4, decoder="static")
    assert model.config._attn_implementation == "sdpa"  # packed attention only while the decoder runs the model
    eager = tiny.build_model(len(tokenizer), seed=3).eval()
    eager.config._attn_implementation = "eager"
    assert static_decoding.why_not_static(eager) == "its attention is eager, not sdpa"
    sliding = tiny.build_model(len(tokenizer), seed=3).eval()
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    assert static_decoding.why_not_static(sliding) == "it has sliding-window attention"


def test_decoder_choice_and_its_errors(tiny_model, monkeypatch):
    model, tokenizer, prompts = tiny_model
    assert generate.decoder_for(model) is None  # auto on a CPU: transformers' generate
    monkeypatch.setenv("T2S_DECODER", "static")
    assert isinstance(generate.decoder_for(model), static_decoding.StaticDecoder)
    monkeypatch.setenv("T2S_DECODER", "cudagraph")
    with pytest.raises(T2SError, match="needs the model on a GPU"):
        generate_batched(model, tokenizer, prompts[:1], 1, 4)
    monkeypatch.setenv("T2S_DECODER", "turbo")
    with pytest.raises(T2SError, match="T2S_DECODER='turbo' is not a decoder: use one of auto, cudagraph"):
        generate_batched(model, tokenizer, prompts[:1], 1, 4)


def test_validation_rows_token_for_token(tiny_model):
    """The real dataset's prompts (longer schemas, more padding), 64 validation rows, batch 16."""
    model, tokenizer, _ = tiny_model
    path = shared_path("data", "sql-create-context", "validation.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:64]]
    prompts = [render_prompt(tokenizer, r["context"], r["question"]) for r in rows]
    reference = generate_batched(model, tokenizer, prompts, 16, 24, decoder="dynamic")
    static = generate_batched(model, tokenizer, prompts, 16, 24, decoder="static")
    assert [(g.text, g.new_tokens) for g in static] == [(g.text, g.new_tokens) for g in reference]
