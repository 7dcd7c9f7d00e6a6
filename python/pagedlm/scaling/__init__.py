"""pagedlm.scaling: parameter, FLOP, memory and KV-cache estimators, scaling laws, and model
design for a compute budget. Pure Python (numpy, scipy); imports nothing else from pagedlm.

    from pagedlm.scaling import ModelConfig, count_params, CHINCHILLA, design_model
    count_params(ModelConfig.preset("llama-7b"))      # 6738415616
    CHINCHILLA.optimal(5.76e23)                        # (N_opt, D_opt, loss)
"""
from .activations import activation_bytes, activation_bytes_per_layer
from .budget import GPU, GPUS, cost_dollars, flops_from_budget, get_gpu, gpu_hours, training_days
from .config import ModelConfig
from .design import ModelDesign, design_model
from .fit import fit_chinchilla
from .flops import chinchilla_forward_flops, forward_flops, training_flops
from .laws import CHINCHILLA, EPOCH_2024, KAPLAN, ChinchillaLaw, KaplanLaw, law_by_name
from .memory import (
    InferenceMemory,
    TrainingMemory,
    inference_memory,
    kv_cache_bytes,
    model_state_bytes,
    training_memory,
)
from .params import count_params, non_embedding_params

__all__ = [
    "ModelConfig", "count_params", "non_embedding_params",
    "forward_flops", "training_flops", "chinchilla_forward_flops",
    "training_memory", "inference_memory", "kv_cache_bytes", "model_state_bytes",
    "activation_bytes", "activation_bytes_per_layer", "TrainingMemory", "InferenceMemory",
    "ChinchillaLaw", "KaplanLaw", "CHINCHILLA", "EPOCH_2024", "KAPLAN", "law_by_name", "fit_chinchilla",
    "GPU", "GPUS", "get_gpu", "flops_from_budget", "gpu_hours", "cost_dollars", "training_days",
    "design_model", "ModelDesign",
    "plot_isoflops",
]


def __getattr__(name):
    # The plot module is cheap to import, but keeping it out of the eager imports means a
    # broken or absent matplotlib can only ever affect plotting.
    if name == "plot_isoflops":
        from .plot import plot_isoflops
        return plot_isoflops
    raise AttributeError(f"module 'pagedlm.scaling' has no attribute {name!r}")
