"""vLLM serving a workload file, for bench_engine.py to run in a process of its own (so each
engine has the GPU to itself): `python bench/vllm_engine.py MODEL_DIR WORKLOAD.json` prints one
JSON line {"seconds": ..., "tokens": ..., "version": ...}. vLLM runs at its defaults (CUDA
graphs and torch.compile on), greedy, EOS ignored, the prompts given as token ids (the model
folder has no tokenizer). Nothing is fetched: the Hugging Face hub and vLLM's usage reports are
switched off."""
import json
import os
import sys
import time

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false",
           # FlashInfer's top-k/top-p sampler is optional in vLLM (a vLLM without FlashInfer
           # would fail to start with it on) and greedy sampling never uses it.
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def main(folder, workload_path):
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    import vllm
    from vllm.inputs import TokensPrompt

    with open(workload_path) as f:
        requests = json.load(f)  # [prompt token ids, output tokens, samples n] each
    llm = vllm.LLM(model=folder, dtype="bfloat16", seed=0, skip_tokenizer_init=True,
                   max_model_len=max(len(p) + o for p, o, _ in requests) + 16)
    params = [vllm.SamplingParams(n=n, temperature=0, max_tokens=o, ignore_eos=True) for _, o, n in requests]
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _, _ in requests]
    llm.generate(prompts[:8], [vllm.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)] * 8,
                 use_tqdm=False)  # warm-up, as pagedlm's
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(sample.token_ids) for o in outputs for sample in o.outputs)
    print(json.dumps({"seconds": seconds, "tokens": tokens, "version": vllm.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
