"""The built-in tiny model: a few-MB Llama built at run time, with a tokenizer trained on the run's own data.

It lets the whole pipeline run with no network on a 2-core CPU (the demo, CI). It carries TinyLlama's chat
template, so prompts look exactly like the real default model's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# TinyLlama-1.1B-Chat-v1.0's chat template, verbatim.
TINYLLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on `texts` (so any text encodes), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="</s>")
    tokenizer.chat_template = TINYLLAMA_CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = 0):
    """A 2-layer Llama (TinyLlama's architecture family, ~1M parameters), randomly initialised."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_base(folder: Path, texts: list[str], seed: int = 0) -> None:
    tokenizer = build_tokenizer(texts)
    model = build_model(len(tokenizer), seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_base_with_tokenizer(folder: Path, tokenizer_dir: Path, seed: int = 0) -> None:
    """The tiny model over a published tokenizer, its files copied as they are (tokenizer.model too): llama.cpp's
    converter refuses a tokenizer trained at run time, so t2s export's tests, bench and image smoke use this one."""
    from transformers import AutoTokenizer

    build_model(len(AutoTokenizer.from_pretrained(str(tokenizer_dir))), seed).save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        if file.name != "config.json":
            shutil.copy(file, folder / file.name)
