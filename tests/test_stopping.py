"""Stopping is part of quality, and a broken model is never published: eval reports how answers end (the model's
end-of-turn token, or cut at eval.max_new_tokens), and `t2s pipeline` ends with push's refusal, not an upload."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from jobs.eval import answer_endings
from jobs.lib.report import render_endings
from jobs.lib.generate import Generation, generate_batched
from tests.conftest import t2s


def test_generation_records_whether_the_model_stopped_itself(prepared_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(prepared_run / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(prepared_run / "base")
    prompts = ["<|user|>\nHow many heads?</s>\n<|assistant|>\n", "<|user|>\nList the names</s>\n<|assistant|>\n"]
    cut = generate_batched(model, tokenizer, prompts, batch_size=2, max_new_tokens=6)
    assert [(g.ended_at_eos, g.new_tokens) for g in cut] == [(False, 6), (False, 6)]  # a random model never stops
    # make a token it writes the end-of-turn token: the same greedy run now stops where that token first comes
    with torch.no_grad():
        ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
        start = ids.shape[1]
        for _ in range(6):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    written = ids[0, start:].tolist()
    tokenizer.eos_token_id = written[-1]
    stopped = generate_batched(model, tokenizer, prompts[:1], batch_size=1, max_new_tokens=6)[0]
    assert (stopped.ended_at_eos, stopped.new_tokens) == (True, written.index(written[-1]) + 1)


def test_answer_endings_and_their_report_section():
    generations = [Generation("SELECT 1", 3, 0.1, ended_at_eos=True)] * 3 + [Generation("SELECT 1 SEL", 24, 0.1, False)]
    assert answer_endings(generations) == {"ended_at_eos": 0.75, "hit_token_limit": 0.25}
    report = {"config": {"max_new_tokens": 24}, "results": {"merged": answer_endings(generations), "old": {}}}
    assert render_endings(report) == ["## How answers end", "",
                                      "| model | end-of-turn token | cut at the token limit (24) |", "|---|---:|---:|",
                                      "| merged | 75.0% | 25.0% |", ""]  # a report from before: no row
    assert render_endings({"config": {}, "results": {"old": {}}}) == []


@pytest.mark.slow
def test_pipeline_ends_with_the_failed_gate_not_an_upload(copy_run):
    with socket.socket() as s:  # a Hub that is not there: any attempt to upload would fail differently
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    run, config = copy_run("gated", push={"repo_id": "someone/t2s-test", "dry_run": False,
                                          "gates": {"min_execution_accuracy": 1.0}})
    result = t2s("pipeline", "--config", str(config),
                 env={"HF_TOKEN": "hf_NOTAREALTOKEN0123456789", "HF_ENDPOINT": nowhere})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("t2s pipeline: error: not publishing run t: ")
    assert "push.gates.min_execution_accuracy 100.0%" in last
    assert "Hub" not in result.stdout + result.stderr and not (run / "push.done").exists()
    assert all((run / f"{job}.done").is_file() for job in ("train", "merge", "eval"))

    # and the eval behind it says how every model's answers ended
    report = json.loads((run / "eval" / "report.json").read_text())
    for label in ("base", "merged"):
        r = report["results"][label]
        assert r["ended_at_eos"] + r["hit_token_limit"] == 1.0
    assert "## How answers end" in (run / "eval" / "report.md").read_text()
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert all(isinstance(p["predictions"]["merged"]["ended_at_eos"], bool) for p in predictions)


class _Written:
    """A model stand-in that 'generates' fixed tokens, so generate_batched's stopping rule is tested on its own."""

    device = torch.device("cpu")

    def __init__(self, new_tokens: list[int]):
        self.new_tokens = new_tokens

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **_):
        self.eos_token_id = eos_token_id
        return torch.cat([input_ids, torch.tensor([self.new_tokens[:max_new_tokens]] * len(input_ids))], dim=1)


def _chatml_tokenizer_with_the_wrong_eos():
    """TinyLlama's tokenizer with a template that ends turns in "</s>" written out, and eos_token set to another
    token, as transformers 5.17 reads SmolLM2's GGUF (eos <|im_start|>, turns end in <|im_end|>)."""
    from jobs.lib.models import load_tokenizer
    from tests.conftest import shared_path

    tokenizer = load_tokenizer(str(shared_path("tokenizers", "tinyllama-1.1b-chat")))
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    tokenizer.eos_token = "<s>"
    return tokenizer


def test_an_answer_ends_at_the_templates_end_of_turn_even_when_the_tokenizer_names_another_eos():
    from jobs.lib.chat import stop_token_ids

    tokenizer = _chatml_tokenizer_with_the_wrong_eos()
    end_of_turn = tokenizer.convert_tokens_to_ids("</s>")
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<s>"), end_of_turn]
    sql = tokenizer("SELECT 1", add_special_tokens=False)["input_ids"]
    model = _Written(sql + [end_of_turn] + tokenizer("\nSELECT 1", add_special_tokens=False)["input_ids"] * 5)
    (answer,) = generate_batched(model, tokenizer, ["<|user|>\nq</s>\n<|assistant|>\n"], 1, max_new_tokens=20)
    assert (answer.text, answer.ended_at_eos, answer.new_tokens) == ("SELECT 1", True, len(sql) + 1)
    assert end_of_turn in model.eos_token_id  # generate itself stops there too, not only the bookkeeping


def test_a_template_whose_turn_ends_in_plain_text_stops_at_eos_only():
    from jobs.lib.chat import stop_token_ids

    tokenizer = _chatml_tokenizer_with_the_wrong_eos()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<s>")]  # never "\n": SQL may span lines
