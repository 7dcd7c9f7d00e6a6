"""Tensor parallelism: LLM(model, tensor_parallel_size=N) splits the model over N processes
(docs/tensor-parallel.md). shard.py: the sharded layers and model; loader.py: each rank's
slices read from the safetensors files; group.py: the driver (rank 0, the LLM's process) and
its worker processes."""
from pagedlm.parallel.group import TensorParallelError, TensorParallelGroup, TensorParallelRunner
from pagedlm.parallel.shard import check_tensor_parallel

__all__ = ["TensorParallelError", "TensorParallelGroup", "TensorParallelRunner", "check_llm_options",
           "check_tensor_parallel"]


def check_llm_options(size, *, model_is_object, speculative, kv_cache_dtype):
    """A ValueError for an LLM option that tensor parallelism does not support (size > 1)."""
    if size == 1:
        return
    if model_is_object:
        raise ValueError(f"tensor_parallel_size: {size} ranks need a model folder (each rank reads its own slices "
                         f"of the safetensors files), got a LlamaForCausalLM object")
    if speculative is not None:
        raise ValueError(f"speculative: speculative decoding is not supported with tensor_parallel_size={size}")
    if kv_cache_dtype is not None:
        raise ValueError(f"kv_cache_dtype: an FP8 KV cache is not supported with tensor_parallel_size={size}")
