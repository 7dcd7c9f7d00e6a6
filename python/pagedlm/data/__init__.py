"""Files shipped inside the package: the small code models trained by tools/tiny_gpu.sh
(tiny-code/target, tiny-code/draft: Hugging Face folders on one byte-level BPE tokenizer,
which ships once, in the target's folder), their held-out token sample and the manifest
of the source files they were trained on."""
from pathlib import Path

TINY_CODE = Path(__file__).parent / "tiny-code"
ROLES = ("target", "draft")


def tiny_model(role="target"):
    """The folder of the shipped target (~9M parameters) or draft; FileNotFoundError naming the
    folder when this install does not have it. The draft's folder has no tokenizer.json (it
    takes token ids, or serves as a speculative draft); its tokenizer is the target's."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    folder = TINY_CODE / role
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: the shipped {role} model is not in this install "
                                "(it is made by tools/tiny_gpu.sh on a GPU machine); pass a model folder instead")
    return folder
