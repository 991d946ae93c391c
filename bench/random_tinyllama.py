"""TinyLlama-1.1B's exact architecture with random weights, plus its real tokenizer and chat template:
throughput and memory do not depend on the weights' values. Usage: random_tinyllama.py SHARED_TOKENIZER OUT"""

import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, out = Path(sys.argv[1]), Path(sys.argv[2])
if not (out / "model.safetensors").is_file() and not list(out.glob("model-*.safetensors")):
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in source.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
print(f"random TinyLlama in {out}")
