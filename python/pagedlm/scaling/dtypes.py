"""Bytes per element of the number formats the memory estimators accept."""
from __future__ import annotations

from . import validate

BYTES_PER_ELEMENT = {
    "fp32": 4, "float32": 4,
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2,
    "fp8": 1, "int8": 1,
    "int4": 0.5,  # packed two to a byte, as in 4-bit KV-cache and weight quantisation
}


def dtype_bytes(name: str, dtype) -> float:
    validate.choice(name, dtype, tuple(BYTES_PER_ELEMENT))
    return BYTES_PER_ELEMENT[dtype]
