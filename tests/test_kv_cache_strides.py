"""write_kv_cache with key and value of different row strides (views into two differently sized
buffers, as when K and V come from separate projections with padding): each must be read with
its own stride. The expected cache is built by plain indexing."""
import torch

import pagedlm.ops as ops


def test_key_and_value_with_different_row_strides_are_each_read_with_their_own():
    tokens, heads, dim, block_size, blocks = 5, 2, 8, 4, 3
    g = torch.Generator().manual_seed(0)
    key_buffer = torch.randn(tokens, 3 * heads * dim, generator=g)
    value_buffer = torch.randn(tokens, 5 * heads * dim, generator=g)
    key = key_buffer[:, heads * dim:2 * heads * dim].view(tokens, heads, dim)
    value = value_buffer[:, 3 * heads * dim:4 * heads * dim].view(tokens, heads, dim)
    assert key.stride(0) != value.stride(0)
    key_cache = torch.zeros(blocks, block_size, heads, dim)
    value_cache = torch.zeros(blocks, block_size, heads, dim)
    slots = torch.tensor([9, 0, -1, 4, 11])
    ops.write_kv_cache(key, value, key_cache, value_cache, slots)
    expected_k, expected_v = torch.zeros_like(key_cache), torch.zeros_like(value_cache)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected_k[slot // block_size, slot % block_size] = key[t]
            expected_v[slot // block_size, slot % block_size] = value[t]
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
