"""Seeded random Llama checkpoints for the tests: transformers builds and saves them, pagedlm
loads them from the folder."""
import torch


def save_llama(folder, config, seed=0):
    """A transformers LlamaForCausalLM with config's fields and seed's weights, saved to folder;
    returns the model (in eval mode), for reference outputs."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    model.save_pretrained(folder)
    return model
