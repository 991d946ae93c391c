"""prep: row validation, leak-free seeded splits, chat rendering and label masking, bad inputs."""

import json
from types import SimpleNamespace

import pytest

from jobs.lib.chat import IGNORE_INDEX, check_chat_template, render_chat, render_prompt, tokenize_example
from jobs.lib.errors import T2SError
from jobs.prep import assign_split, split_key, split_rows, validate_row
from tests.conftest import shared_path, t2s, tiny_config, write_config

GOOD = {"question": "How many heads?", "context": "CREATE TABLE head (age INTEGER)",
        "answer": "SELECT COUNT(*) FROM head"}


@pytest.mark.parametrize("change, reason", [
    ({"question": None}, "missing_question"),
    ({"context": ""}, "empty_context"),
    ({"answer": 42}, "non_string_answer"),
    ({"context": "SELECT 1"}, "context_not_create_table"),
    ({"context": "CREATE TABLE t (a"}, "context_not_create_table"),
    ({"answer": "SELECT 1; SELECT 2"}, "answer_not_one_query"),
    ({"answer": "The answer is SELECT 1"}, "answer_not_one_query"),
    ({"answer": "DROP TABLE head"}, "answer_not_one_query"),
])
def test_validate_row_names_the_reason(change, reason):
    assert validate_row(GOOD) is None
    assert validate_row({**GOOD, **change}) == reason


def test_two_create_tables_are_a_valid_context():
    row = {**GOOD, "context": "CREATE TABLE a (x INTEGER); CREATE TABLE b (y VARCHAR)"}
    assert validate_row(row) is None


def test_split_is_seeded_stable_and_keeps_a_question_in_one_split():
    data = SimpleNamespace(seed=7, validation_fraction=0.2, test_fraction=0.2)
    rows = [{"question": f"Question {i % 50}?", "context": GOOD["context"], "answer": f"SELECT {i}"}
            for i in range(300)]
    rows += [{"question": "question 3 ", "context": GOOD["context"], "answer": "SELECT 3"}]  # same as row 3
    splits, dropped = split_rows(rows, None, data)
    again, _ = split_rows(list(reversed(rows)), None, data)
    where = {}
    for name, members in splits.items():
        for row in members:
            assert where.setdefault(split_key(row["question"]), name) == name
    assert dropped["duplicate_pair"] == 1
    assert {n: sorted(r["answer"] for r in m) for n, m in splits.items()} == \
           {n: sorted(r["answer"] for r in m) for n, m in again.items()}
    assert all(splits[name] for name in splits)
    assert assign_split("Question 1?", 7, 0.2, 0.2) == assign_split("question 1", 7, 0.2, 0.2)


def test_given_validation_split_claims_its_questions_first():
    data = SimpleNamespace(seed=1, validation_fraction=0.1, test_fraction=0.1)
    train = [{**GOOD, "question": f"q{i}", "answer": f"SELECT {i}"} for i in range(50)]
    given = {"validation": [{**GOOD, "question": "Q1", "answer": "SELECT 99"}]}
    splits, dropped = split_rows(train, given, data)
    assert dropped["question_in_other_split"] == 1
    assert all(split_key(r["question"]) != "q1" for r in splits["train"] + splits["test"])


def test_tinyllama_rendering_is_byte_for_byte_and_labels_mask_the_prompt():
    from jobs.lib.models import load_tokenizer

    tokenizer = load_tokenizer(str(shared_path("tokenizers", "tinyllama-1.1b-chat")))  # as prep, train and eval load it
    context, question, answer = "CREATE TABLE head (age INTEGER)", "How many heads are older than 56?", \
        "SELECT COUNT(*) FROM head WHERE age > 56"
    prompt, completion = render_chat(tokenizer, context, question, answer)
    assert prompt + completion == f"<|system|>\n{context}</s>\n<|user|>\n{question}</s>\n<|assistant|>\n{answer}</s>\n"
    assert render_prompt(tokenizer, context, question) == prompt  # generation starts from the trained prefix
    assert prompt.endswith("<|assistant|>\n")

    example = tokenize_example(tokenizer, context, question, answer)
    assert example.input_ids == tokenizer(prompt + completion)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    n = len(prompt_ids)
    assert example.input_ids[:n] == prompt_ids
    for i, (token, label) in enumerate(zip(example.input_ids, example.labels)):
        assert label == (IGNORE_INDEX if i < n else token)
    assert tokenizer.decode(example.input_ids[n:]) == answer + "</s>\n"


def test_tokenizer_without_chat_template_is_refused():
    with pytest.raises(T2SError, match="no chat template"):
        check_chat_template(SimpleNamespace(chat_template=None), "some/tokenizer")


def test_prep_of_real_rows_with_the_real_tokenizer(tmp_path):
    data = shared_path("data", "sql-create-context")
    tokenizer = shared_path("tokenizers", "tinyllama-1.1b-chat")
    config = tiny_config(tmp_path / "runs", model={"name_or_path": str(tokenizer)},
                         data={"source": str(data), "max_rows": 1500, "max_length": 512})
    result = t2s("prep", "--config", str(write_config(tmp_path / "c.yaml", config)))
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "t"
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["rows"]["validation"] > 1000  # the source's own validation split is kept
    assert manifest["rows"]["train"] > 1000 and manifest["rows"]["test"] > 30
    assert manifest["tokens"]["max"] <= 512 and len(manifest["content_hash"]) == 64
    splits = {s: [json.loads(l) for l in (run / "data" / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "validation", "test")}
    keys = {s: {split_key(r["question"]) for r in rows} for s, rows in splits.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert (run / "prep.done").is_file()


def _prep_error(tmp_path, **sections) -> str:
    config = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "runs", **sections))
    result = t2s("prep", "--config", str(config))
    assert result.returncode == 2, result.stdout[-1000:] + result.stderr[-1000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "t" / "prep.done").exists()
    return result.stderr.strip().splitlines()[-1]


def test_missing_dataset_path(tmp_path):
    assert "dataset path ./nope.jsonl does not exist" in _prep_error(tmp_path, data={"source": "./nope.jsonl"})


def test_dataset_without_the_three_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"q": "x", "sql": "SELECT 1"}) + "\n")
    assert "lacks column(s) question, context, answer" in _prep_error(tmp_path, data={"source": str(path)})


def test_empty_dataset(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("")
    line = _prep_error(tmp_path, data={"source": str(path)})
    assert "empty" in line or "could not read" in line


def test_a_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GOOD) + "\nnot json\n")
    line = _prep_error(tmp_path, data={"source": str(path)})
    assert f"could not read dataset file {path}: JSON parse error" in line and "row 1" in line


def test_too_many_bad_rows_fails_and_writes_rejects(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [GOOD] * 3 + [{**GOOD, "answer": "not sql at all"}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = _prep_error(tmp_path, data={"source": str(path), "max_reject_fraction": 0.1})
    assert "3 of 6 rows rejected (answer_not_one_query=3)" in line
    rejects = (tmp_path / "runs" / "t" / "data.partial" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 3 and json.loads(rejects[0])["reason"] == "answer_not_one_query"


def test_model_path_that_does_not_exist(tmp_path):
    line = _prep_error(tmp_path, model={"name_or_path": "/no/such/model"})
    assert "path /no/such/model does not exist" in line


def test_tokenizer_without_chat_template_fails_prep(tmp_path):
    from jobs.lib.tiny import build_tokenizer

    tokenizer = build_tokenizer(["select a from b"] * 10, vocab_size=300)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").unlink(missing_ok=True)
    line = _prep_error(tmp_path, model={"name_or_path": "tiny", "tokenizer": str(tmp_path / "tok")})
    assert "has no chat template" in line
