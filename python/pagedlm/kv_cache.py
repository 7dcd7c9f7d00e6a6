"""The engine's KV cache dtype and scales: kv_cache_dtype as vLLM spells it ("auto", "fp8" =
"fp8_e4m3", "fp8_e5m2"), one (key_cache, value_cache) pair per layer carrying that layer's
k_scale / v_scale, scales read from a checkpoint (vLLM / llm-compressor names) or measured from
the first prefill's keys and values.

An FP8 cache stores saturate(x / scale) rounded to nearest even and the attention kernels read
stored * scale; with scale 1.0 that is plain rounding to FP8 (e4m3: 3 mantissa bits, values up
to 448; e5m2: 2 bits, up to 57344)."""
import re

import torch

KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}


def resolve_kv_cache_dtype(value):
    """The cache's torch dtype for kv_cache_dtype, or None for "auto" (the model's dtype)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype) and value in KV_CACHE_DTYPES.values():
        return value
    if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: must be one of {', '.join(map(repr, KV_CACHE_DTYPES))} "
                         f"(\"fp8\" is fp8_e4m3), got {value!r}")
    return KV_CACHE_DTYPES[value]


class LayerKVCache(tuple):
    """One layer's (key_cache, value_cache), with its scales: float32 tensors on the cache's
    device, 0-d or one value per kv head, updated in place (CUDA graphs read them from memory).
    `measure`: the next forward that brings tokens sets the scales from them (amax / format max)
    before it writes them."""

    def __new__(cls, key_cache, value_cache, k_scale=None, v_scale=None):
        self = super().__new__(cls, (key_cache, value_cache))
        one = torch.ones((), dtype=torch.float32, device=key_cache.device)
        self.k_scale = one.clone() if k_scale is None else k_scale.to(device=key_cache.device,
                                                                       dtype=torch.float32).contiguous()
        self.v_scale = one.clone() if v_scale is None else v_scale.to(device=key_cache.device,
                                                                       dtype=torch.float32).contiguous()
        self.measure = False
        return self

    @property
    def is_fp8(self):
        return self[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def measuring(kv_caches):
    """Whether a layer's cache still waits for the next forward to measure its scales (no CUDA
    graph may run that forward: a capture's warm-up would measure the padding, a replay nothing)."""
    return any(isinstance(cache, LayerKVCache) and cache.measure for cache in kv_caches)


def kv_cache_scales(kv_cache, key, value):
    """(k_scale, v_scale) to pass the kernels for this layer's cache: 1.0 for a plain pair or a
    16/32-bit cache. A cache asked to measure takes its scales from key and value first (never
    inside a CUDA graph capture: a captured measurement would rescale on every replay)."""
    if not isinstance(kv_cache, LayerKVCache) or not kv_cache.is_fp8:
        return 1.0, 1.0
    if kv_cache.measure and key.shape[0] > 0 and not (key.is_cuda and torch.cuda.is_current_stream_capturing()):
        fmax = torch.finfo(kv_cache[0].dtype).max
        for scale, x in ((kv_cache.k_scale, key), (kv_cache.v_scale, value)):
            amax = x.detach().float().abs().nan_to_num(0.0, 0.0, 0.0).amax()
            # A layer whose first keys are all zero keeps scale 1.0.
            scale.fill_(1.0).copy_(torch.where(amax > 0, amax / fmax, torch.ones_like(amax)).expand_as(scale))
        kv_cache.measure = False
    return kv_cache.k_scale, kv_cache.v_scale


_SCALE_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\..*?(k_scale|v_scale|kv_scale)$")


def checkpoint_kv_scales(files, num_layers, num_kv_heads):
    """{layer: {"k": tensor, "v": tensor}} from the safetensors files' `*.k_scale`, `*.v_scale` and
    `*.kv_scale` tensors (one value, or one per kv head); kv_scale serves both. Each must be
    finite and > 0 (ValueError naming the file and tensor)."""
    from safetensors import safe_open
    scales = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as weights:
                names = [n for n in weights.keys() if _SCALE_NAME.search(n)]
                tensors = {n: weights.get_tensor(n) for n in names}
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{f}: cannot read safetensors ({e})") from None
        for name, t in tensors.items():
            layer, kind = _SCALE_NAME.search(name).groups()
            layer = int(layer)
            if layer >= num_layers:
                continue  # another model's (a draft's) or a layer this config does not build
            if not t.is_floating_point() or t.numel() not in (1, num_kv_heads):
                raise ValueError(f"{f}: {name} must be one float or one per kv head ({num_kv_heads}), "
                                 f"got {t.dtype} {tuple(t.shape)}")
            t = t.float().reshape(()) if t.numel() == 1 else t.float().reshape(num_kv_heads)
            if not bool((torch.isfinite(t) & (t > 0)).all()):
                raise ValueError(f"{f}: {name} must be finite and > 0, got {t.tolist()}")
            for k in ("k", "v") if kind == "kv_scale" else (kind[0],):
                # k_scale / v_scale win over a kv_scale of the same layer.
                if kind != "kv_scale" or k not in scales.get(layer, {}):
                    scales.setdefault(layer, {})[k] = t
    return scales


def make_layer_caches(pairs, *, scales=None, measure=False):
    """LayerKVCache per layer from (key_cache, value_cache) pairs; scales as checkpoint_kv_scales
    returns them (missing: 1.0). measure: take the scales from the first prefill instead."""
    scales = scales or {}
    caches = []
    for i, (k, v) in enumerate(pairs):
        layer = scales.get(i, {})
        cache = LayerKVCache(k, v, layer.get("k"), layer.get("v"))
        cache.measure = measure and cache.is_fp8
        caches.append(cache)
    return caches


def describe_scales(caches):
    """Per layer (k_scale, v_scale) as Python floats or lists, for reports and tests."""
    def plain(t):
        return t.item() if t.dim() == 0 else t.tolist()
    return [(plain(c.k_scale), plain(c.v_scale)) for c in caches if isinstance(c, LayerKVCache)]


__all__ = ["KV_CACHE_DTYPES", "LayerKVCache", "checkpoint_kv_scales", "describe_scales", "kv_cache_scales",
           "make_layer_caches", "resolve_kv_cache_dtype"]
