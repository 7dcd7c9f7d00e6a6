"""write_kv_cache and copy_blocks against plain torch indexing, on CPU (CI) and CUDA (gpu)."""
import pytest
import torch

import pagedlm.ops as ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads, head_dim, block_size", [(8, 128, 16), (1, 64, 1), (3, 7, 5), (2, 256, 32)])
def test_write_kv_cache_matches_indexing(device, dtype, num_kv_heads, head_dim, block_size):
    num_blocks, tokens = 37, 29
    # key/value are slices of a fused QKV projection: tokens are not adjacent in memory.
    qkv = torch.randn(tokens, 3, num_kv_heads, head_dim).to(dtype).to(device)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[3] = -1  # padding token: skipped
    slots = slots.to(device)
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    value_cache = key_cache.clone()
    expected_k, expected_v = key_cache.clone().flatten(0, 1), value_cache.clone().flatten(0, 1)
    keep = slots >= 0
    expected_k[slots[keep]] = key[keep]
    expected_v[slots[keep]] = value[keep]
    ops.write_kv_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.flatten(0, 1).nan_to_num(7), expected_k.nan_to_num(7))
    assert torch.equal(value_cache.flatten(0, 1).nan_to_num(7), expected_v.nan_to_num(7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_copy_blocks_copies_every_layer(device, dtype):
    layers = 3
    keys = [torch.randn(10, 16, 2, 64).to(dtype).to(device) for _ in range(layers)]
    values = [torch.randn(10, 16, 2, 64).to(dtype).to(device) for _ in range(layers)]
    mapping = torch.tensor([[0, 5], [3, 9], [7, 7]], dtype=torch.int64, device=device)
    expected = [(k.clone(), v.clone()) for k, v in zip(keys, values)]
    for k, v in expected:
        for src, dst in mapping.tolist():
            k[dst], v[dst] = k[src].clone(), v[src].clone()
    ops.copy_blocks(keys, values, mapping)
    for (k, v), (ek, ev) in zip(zip(keys, values), expected):
        assert torch.equal(k, ek) and torch.equal(v, ev)


@pytest.fixture
def cache():
    return torch.zeros(4, 2, 2, 8), torch.zeros(4, 2, 2, 8)


@pytest.mark.parametrize("call, error, argument", [
    (lambda k, v: ops.write_kv_cache(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), k, v,
                                     torch.tensor([0, 1, 8])), ValueError, "slot_mapping"),
    (lambda k, v: ops.write_kv_cache(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), k, v,
                                     torch.tensor([0, 1, -2])), ValueError, "slot_mapping"),
    (lambda k, v: ops.write_kv_cache(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), k, v,
                                     torch.tensor([0, 1, 2], dtype=torch.int32)), TypeError, "slot_mapping"),
    (lambda k, v: ops.write_kv_cache(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), k, v,
                                     torch.tensor([0, 1])), ValueError, "slot_mapping"),
    (lambda k, v: ops.write_kv_cache(torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), k, v,
                                     torch.tensor([0, 1, 2])), ValueError, "key"),
    (lambda k, v: ops.write_kv_cache(torch.zeros(3, 2, 8).half(), torch.zeros(3, 2, 8), k, v,
                                     torch.tensor([0, 1, 2])), TypeError, "key"),
    (lambda k, v: ops.write_kv_cache(torch.zeros(3, 8, 2).transpose(1, 2), torch.zeros(3, 2, 8), k, v,
                                     torch.tensor([0, 1, 2])), ValueError, "key"),
    (lambda k, v: ops.write_kv_cache(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), k[:, :1], v,
                                     torch.tensor([0, 1, 2])), ValueError, "key_cache"),
    (lambda k, v: ops.copy_blocks([k], [v], torch.tensor([[0, 4]])), ValueError, "block_mapping"),
    (lambda k, v: ops.copy_blocks([k], [v], torch.tensor([0, 1])), ValueError, "block_mapping"),
    (lambda k, v: ops.copy_blocks([k], [v, v], torch.tensor([[0, 1]])), ValueError, "value_caches"),
    (lambda k, v: ops.copy_blocks([k], [v.half()], torch.tensor([[0, 1]])), TypeError, "value_caches"),
])
def test_bad_input_raises_naming_the_argument(cache, call, error, argument):
    k, v = cache
    with pytest.raises(error, match=argument):
        call(k, v)
    assert torch.all(k == 0) and torch.all(v == 0)  # nothing was written


def test_torch_ops_and_opcheck():
    key_cache, value_cache = torch.zeros(6, 4, 2, 16), torch.zeros(6, 4, 2, 16)
    key, value = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([0, 3, 9, -1, 23])
    torch.ops.pagedlm.write_kv_cache(key, value, key_cache, value_cache, slots)
    assert torch.equal(key_cache.flatten(0, 1)[9], key[2])
    torch.library.opcheck(torch.ops.pagedlm.write_kv_cache.default, (key, value, key_cache, value_cache, slots))
    mapping = torch.tensor([[0, 1], [2, 5]])
    torch.library.opcheck(torch.ops.pagedlm.copy_blocks.default, ([key_cache], [value_cache], mapping))
