"""A small CUDA case for compute-sanitizer (memcheck, racecheck): every op once (both prefill kernels),
split-K on, a bad block id and an out-of-range length included, decode under a custom mask, the
Hopper prefill kernel's persistent grid, and FP8 caches on every attention kernel that reads them."""
import torch

import pagedlm.ops as ops

torch.manual_seed(0)
for dtype, head_dim in [(torch.bfloat16, 128), (torch.float32, 64), (torch.float16, 256)]:
    kc = torch.randn(40, 16, 2, head_dim, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(3, 8, head_dim, device="cuda", dtype=dtype)
    tables = torch.randperm(40, device="cuda")[:39].view(3, 13).int()
    tables[2, 3] = 1 << 20
    lens = torch.tensor([200, 1, 1 << 30], dtype=torch.int32, device="cuda")
    out, lse = ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True, sliding_window=150)
    # A custom mask per row (the masked-prefill rows' form); the third row's offset is out of range.
    mask = torch.rand(700, device="cuda") < 0.5
    offsets = torch.tensor([0, 250, 600], device="cuda")
    ops.paged_decode_attention(q, kc, vc, tables, lens.clamp(max=200), custom_mask=mask, mask_offsets=offsets)
    ops.write_kv_cache(torch.randn(5, 2, head_dim, device="cuda", dtype=dtype),
                       torch.randn(5, 2, head_dim, device="cuda", dtype=dtype), kc, vc,
                       torch.tensor([0, 17, -1, 639, 5], device="cuda"))
    ops.copy_blocks([kc], [vc], torch.tensor([[0, 1], [5, 39]], device="cuda"))
    logits = torch.randn(5, 4099, device="cuda", dtype=dtype)  # odd vocabulary: unaligned rows
    logits[1, 7] = float("nan")
    ops.argmax_logprob(logits)
    # The fused layers: odd widths (their scalar paths) and 16-byte packs.
    for width in (1027, 1024):
        x = torch.randn(7, 2 * width, device="cuda", dtype=dtype)
        ops.rms_norm(x[:, :width].contiguous(), torch.randn(width, device="cuda", dtype=dtype), 1e-5,
                     residual=torch.randn(7, width, device="cuda", dtype=dtype))
        ops.silu_and_mul(x)
    qkv = torch.randn(5, 14, head_dim, device="cuda", dtype=dtype)  # 8 query, 2 key, 2 value heads, padded
    positions = torch.arange(5, device="cuda") * 1000
    inv_freq = torch.rand(head_dim // 2, device="cuda")
    ops.apply_rope(qkv[:, :8], qkv[:, 8:10], positions, inv_freq)
    ops.apply_rope(qkv[:, :8], qkv[:, 8:10], positions, inv_freq, query_out=torch.empty(5, 8, head_dim, device="cuda",
                                                                                         dtype=dtype))
# A row long enough to be split (split-K and the merge kernel), a bad block id in its last split.
kc = torch.randn(300, 16, 2, 128, device="cuda", dtype=torch.bfloat16)
vc = torch.randn_like(kc)
tables = torch.randperm(300, device="cuda")[:256].view(1, 256).int()
ops.paged_decode_attention(torch.randn(1, 8, 128, device="cuda", dtype=torch.bfloat16), kc, vc, tables,
                           torch.tensor([4000], dtype=torch.int32, device="cuda"), return_lse=True)
tables[0, 240] = -1
ops.paged_decode_attention(torch.randn(1, 8, 128, device="cuda", dtype=torch.bfloat16), kc, vc, tables,
                           torch.tensor([4000], dtype=torch.int32, device="cuda"))
torch.cuda.synchronize()
print("sanitize case done")

# Prefill: a causal batch, a custom mask, a bad block id.
for dtype, head_dim in [(torch.bfloat16, 128), (torch.float16, 64), (torch.bfloat16, 256)]:
    kc = torch.randn(40, 16, 2, head_dim, device="cuda", dtype=dtype)
    vc = torch.randn_like(kc)
    tables = torch.randperm(40, device="cuda")[:39].view(3, 13).int()
    tables[2, 1] = 1 << 20
    lens = torch.tensor([200, 70, 30], dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, 100, 103, 133], dtype=torch.int32, device="cuda")
    q = torch.randn(133, 8, head_dim, device="cuda", dtype=dtype)
    # Without a custom mask Hopper takes the wgmma kernel (paged_prefill_sm90.cu); "mma" asks for the other.
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, sliding_window=64)
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, sliding_window=64, soft_cap=5.0, backend="mma")
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, return_lse=True)
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, causal=False, soft_cap=5.0)
    mask = torch.rand(100 * 200 + 3 * 70 + 30 * 30, device="cuda") < 0.5
    indptr = torch.tensor([0, 20000, 20210, 21110], dtype=torch.int32, device="cuda")
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, custom_mask=mask, mask_indptr=indptr)

# The Hopper kernel's persistent grid: a work counter, several items per block through one K/V ring.
ops.PERSISTENT_PREFILL_MIN_WORK = 0
kc = torch.randn(260, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
vc = torch.randn_like(kc)
tables = torch.randperm(260, device="cuda").view(2, 130).int()
tables[1, 7] = -3
lens = torch.tensor([1900, 2000], dtype=torch.int32, device="cuda")
cu = torch.tensor([0, 1900, 2500], dtype=torch.int32, device="cuda")
q = torch.randn(2500, 32, 128, device="cuda", dtype=torch.bfloat16)
ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, return_lse=True)
ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, sliding_window=300)
ops.paged_prefill_attention(q, kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn), tables, cu, lens,
                            k_scale=0.5, v_scale=2.0)
torch.cuda.synchronize()
print("sanitize prefill case done")

# FP8 caches: 16-bit queries take the tensor-core decode and, on Hopper, the wgmma prefill (byte tiles
# widened by its producer), else or under a custom mask the mma prefill (byte tiles widened in shared
# memory); f32 queries the CUDA-core kernel. Split-K, a custom mask, bad ids and lengths.
for fp8, dtype, head_dim in [(torch.float8_e4m3fn, torch.bfloat16, 128), (torch.float8_e5m2, torch.float16, 64),
                             (torch.float8_e4m3fn, torch.float32, 128), (torch.float8_e4m3fn, torch.float16, 256)]:
    kc = torch.randn(300, 16, 2, head_dim, device="cuda").to(fp8)
    vc = torch.randn(300, 16, 2, head_dim, device="cuda").to(fp8)
    k_scale = torch.tensor([0.5, 2.0], device="cuda")
    tables = torch.randperm(300, device="cuda")[:288].view(3, 96).int()
    tables[2, 3] = 1 << 20
    q = torch.randn(3, 8, head_dim, device="cuda", dtype=dtype)
    lens = torch.tensor([1500, 1, 1 << 30], dtype=torch.int32, device="cuda")
    ops.paged_decode_attention(q, kc, vc, tables, lens, return_lse=True, k_scale=k_scale, v_scale=0.25)
    mask = torch.rand(3000, device="cuda") < 0.5
    ops.paged_decode_attention(q, kc, vc, tables, lens.clamp(max=900), custom_mask=mask,
                               mask_offsets=torch.tensor([0, 950, 2500], device="cuda"), k_scale=k_scale)
    ops.write_kv_cache(torch.randn(5, 2, head_dim, device="cuda", dtype=dtype),
                       torch.randn(5, 2, head_dim, device="cuda", dtype=dtype), kc, vc,
                       torch.tensor([0, 17, -1, 4799, 5], device="cuda"), k_scale=k_scale, v_scale=0.25)
    lens = torch.tensor([200, 70, 30], dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, 100, 103, 133], dtype=torch.int32, device="cuda")
    q = torch.randn(133, 8, head_dim, device="cuda", dtype=dtype)
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, sliding_window=64, k_scale=k_scale, v_scale=0.25)
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, return_lse=True, k_scale=k_scale)
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, k_scale=k_scale, backend="mma")
    mask = torch.rand(100 * 200 + 3 * 70 + 30 * 30, device="cuda") < 0.5
    indptr = torch.tensor([0, 20000, 20210, 21110], dtype=torch.int32, device="cuda")
    ops.paged_prefill_attention(q, kc, vc, tables, cu, lens, custom_mask=mask, mask_indptr=indptr, v_scale=0.25)
torch.cuda.synchronize()
print("sanitize fp8 case done")
