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


def save_random_checkpoint(folder, config, seed=0):
    """A Hugging Face style folder (config.json, model.safetensors) of pagedlm's seeded random
    model, written without transformers; returns the model."""
    import json

    from safetensors.torch import save_file

    from pagedlm.models import random_model
    from pagedlm.models.loader import checkpoint_names
    model = random_model(config, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {name: param[rows].detach().clone().contiguous()
               for name, (param, rows) in checkpoint_names(model).items()
               if not (name == "lm_head.weight" and model.args.tie_word_embeddings)}
    save_file(tensors, str(folder / "model.safetensors"))
    return model
