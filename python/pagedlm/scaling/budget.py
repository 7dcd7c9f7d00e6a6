"""From dollars to training FLOPs and back to GPU-hours and days, per GPU type.

Peak figures are dense (no 2:4 sparsity) BF16 tensor-core FLOP/s from NVIDIA's datasheets.
Prices are rough 2025 on-demand rates per GPU-hour at specialised GPU clouds: they vary by
provider and contract by 2x or more, so every function takes an override.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import validate

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense BF16 FLOP/s
    memory_bytes: float
    price_per_hour: float  # dollars per GPU-hour
    source: str

    def __post_init__(self):
        for field in ("peak_flops", "memory_bytes", "price_per_hour"):
            validate.positive_number(field, getattr(self, field))


GPUS = {
    "A100": GPU("A100", 312e12, 80e9, 1.50, "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): BF16 312 TFLOPS"),
    "H100": GPU("H100", 989e12, 80e9, 2.50,
                "NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 TFLOPS with sparsity, half dense"),
    "H200": GPU("H200", 989e12, 141e9, 3.50,
                "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 TFLOPS with sparsity, half dense"),
    "B200": GPU("B200", 2.25e15, 180e9, 5.00,
                "NVIDIA HGX B200 specification: per GPU BF16 4.5 PFLOPS with sparsity, half dense; 180 GB"),
}


def get_gpu(gpu) -> GPU:
    """A GPU entry by name (case-insensitive), or a GPU passed through."""
    return gpu if isinstance(gpu, GPU) else validate.lookup("gpu", gpu, GPUS)


def _rates(gpu, price_per_hour, peak_flops, mfu) -> tuple[GPU, float, float, float]:
    gpu = get_gpu(gpu)
    price = gpu.price_per_hour if price_per_hour is None else validate.positive_number("price_per_hour", price_per_hour)
    peak = gpu.peak_flops if peak_flops is None else validate.positive_number("peak_flops", peak_flops)
    return gpu, price, peak, validate.fraction("mfu", mfu)


def flops_from_budget(dollars: float, gpu, *, price_per_hour: float | None = None, peak_flops: float | None = None,
                      mfu: float = 0.4) -> float:
    """Training FLOPs that `dollars` buy: GPU-hours * 3600 * peak * MFU.

    MFU 0.4 is typical of well-tuned large dense runs (PaLM reports 46%, Chowdhery et al.
    2022, Table 3; Llama 3 405B 38-43%, Dubey et al. 2024, Table 4).
    """
    dollars = validate.positive_number("dollars", dollars)
    _, price, peak, mfu = _rates(gpu, price_per_hour, peak_flops, mfu)
    return dollars / price * 3600.0 * peak * mfu


def gpu_hours(flops: float, gpu, *, peak_flops: float | None = None, mfu: float = 0.4) -> float:
    flops = validate.positive_number("flops", flops)
    _, _, peak, mfu = _rates(gpu, None, peak_flops, mfu)
    return flops / (peak * mfu) / 3600.0


def cost_dollars(flops: float, gpu, *, price_per_hour: float | None = None, peak_flops: float | None = None,
                 mfu: float = 0.4) -> float:
    _, price, _, _ = _rates(gpu, price_per_hour, peak_flops, mfu)
    return gpu_hours(flops, gpu, peak_flops=peak_flops, mfu=mfu) * price


def training_days(flops: float, gpu, n_gpus: int, *, peak_flops: float | None = None, mfu: float = 0.4) -> float:
    """Wall-clock days on n_gpus GPUs, assuming the MFU holds at that scale."""
    n_gpus = validate.positive_int("n_gpus", n_gpus)
    return gpu_hours(flops, gpu, peak_flops=peak_flops, mfu=mfu) / n_gpus / 24.0
