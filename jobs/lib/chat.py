"""The prompt is the model's own chat template: system = CREATE TABLE context, user = question, assistant = SQL.

Training and generation must see the exact same prompt prefix. TinyLlama's template ends its generation
prompt in "<|assistant|>" while the training text has "<|assistant|>\\n" before the SQL: rendering the
generation prompt with `add_generation_prompt=True` would silently cost accuracy. So the prompt is taken
from the rendered training text itself: everything before the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.lib.errors import T2SError

IGNORE_INDEX = -100  # label of tokens that carry no loss (the prompt)
_ANSWER_SENTINEL = "\x00T2S_ANSWER\x00"

# The seed's prompt-engineering variants, for measuring the base model (issue: base-plain vs base-prompted).
INSTRUCTED_SYSTEM = (
    "You can only reply in SQL query language. Provide only SQL for the user's query given this context --> {context}"
)
ONE_SHOT = {
    "context": "CREATE TABLE head (age INTEGER)",
    "question": "How many heads of the departments are older than 56 ?",
    "answer": "SELECT COUNT(*) FROM head WHERE age > 56",
}


def messages_for(context: str, question: str, variant: str = "plain") -> list[dict[str, str]]:
    if variant == "plain":
        return [{"role": "system", "content": context}, {"role": "user", "content": question}]
    if variant == "instructed":
        return [{"role": "system", "content": INSTRUCTED_SYSTEM.format(context=context)},
                {"role": "user", "content": question}]
    if variant == "one_shot":
        return [
            {"role": "system", "content": INSTRUCTED_SYSTEM.format(context=f"{ONE_SHOT['context']}; {context}")},
            {"role": "user", "content": ONE_SHOT["question"]},
            {"role": "assistant", "content": ONE_SHOT["answer"]},
            {"role": "user", "content": question},
        ]
    raise ValueError(f"unknown prompt variant {variant!r}")


def check_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise T2SError(
            f"the tokenizer from {where} has no chat template: use a chat model's tokenizer "
            "(or add chat_template.jinja to it)"
        )


def render_chat(tokenizer, context: str, question: str, answer: str, variant: str = "plain") -> tuple[str, str]:
    """(prompt, completion): the training text is prompt + completion, and prompt is what generation starts from."""
    messages = messages_for(context, question, variant) + [{"role": "assistant", "content": _ANSWER_SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt, sep, rest = text.partition(_ANSWER_SENTINEL)
    if not sep:
        raise T2SError("the chat template dropped the assistant turn: it cannot be used for training")
    return prompt, answer + rest


def stop_token_ids(tokenizer) -> list[int]:
    """The tokens that end an answer: the tokenizer's eos and the special token the chat template puts right after
    the assistant's content (its end of turn). They differ for some tokenizers: SmolLM2's GGUF, read by transformers
    5.17, names <|im_start|> its eos, while the template ends a turn with <|im_end|>; generation that stopped at the
    eos alone ran on past every answer to max_new_tokens."""
    _, completion = render_chat(tokenizer, "CREATE TABLE t (a INTEGER)", "How many rows?", "")
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end_of_turn = tokenizer.added_tokens_decoder.get(tail[0]) if tail else None  # all_special_ids may omit it
    if end_of_turn is not None and end_of_turn.special and tail[0] not in stops:
        stops.append(tail[0])
    return stops


def render_prompt(tokenizer, context: str, question: str, variant: str = "plain") -> str:
    """The generation prompt: exactly the prefix the model was trained on."""
    return render_chat(tokenizer, context, question, "", variant)[0]


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: loss on the completion only


def tokenize_examples(tokenizer, rows: list[dict[str, str]]) -> list[TokenizedExample | None]:
    """Each training text tokenized whole (so it decodes to the template's text byte for byte), with the
    prompt's tokens masked. None where the text's tokens do not start with the prompt's own tokens: the model
    would be trained on a prefix that generation never gives it."""
    rendered = [render_chat(tokenizer, r["context"], r["question"], r["answer"]) for r in rows]
    prompts = tokenizer([prompt for prompt, _ in rendered])["input_ids"]
    texts = tokenizer([prompt + completion for prompt, completion in rendered])["input_ids"]
    return [
        TokenizedExample(ids, [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]) if ids[: len(prompt)] == prompt else None
        for prompt, ids in zip(prompts, texts)
    ]


def tokenize_example(tokenizer, context: str, question: str, answer: str) -> TokenizedExample | None:
    return tokenize_examples(tokenizer, [{"context": context, "question": question, "answer": answer}])[0]
