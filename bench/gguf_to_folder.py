"""A GGUF file as a model folder that `t2s ask --model` and the bench scripts load (dequantised, saved in bf16).

    python bench/gguf_to_folder.py /tmp/t2s-device/model/SmolLM2-135M-Instruct.Q4_1.gguf /tmp/smollm2
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jobs.lib.models import load_model, load_tokenizer  # noqa: E402

gguf, out = Path(sys.argv[1]), Path(sys.argv[2])
if not (out / "config.json").is_file():
    model = load_model(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
print(f"{gguf.name} as a model folder in {out}")
