"""pagedlm: paged KV-cache management and attention kernels for LLM inference.

The compiled core (`pagedlm._C`) is imported on first use, so the pure-Python parts
(`pagedlm.scaling`) work without it.
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pagedlm")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

# name -> module that defines it, imported on first access.
_LAZY = {
    "BlockManager": "pagedlm._C",
    "OutOfBlocksError": "pagedlm._C",
    "LLM": "pagedlm.llm",
    "SamplingParams": "pagedlm.llm",
    "Logprob": "pagedlm.llm",
    "BeamSearchParams": "pagedlm.beam_search",
    "AsyncLLM": "pagedlm.serving",
}

_SUBMODULES = ("ops", "scaling", "workload", "models", "engine")

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name):
    if name in _SUBMODULES:
        return import_module(f"pagedlm.{name}")
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pagedlm' has no attribute {name!r}")
