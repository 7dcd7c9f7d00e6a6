"""A trained model as a Hugging Face folder: config.json, model.safetensors (bf16),
tokenizer.json (the target's only: the draft shares it), and training.json with what the
run measured."""
import json
import platform
from pathlib import Path

import torch


def card_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def save_folder(model, tokenizer, folder, record):
    """Write the model (already in its shipped dtype), its tokenizer unless None, and its
    record; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return folder
