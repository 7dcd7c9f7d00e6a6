"""vLLM serving a workload file, for bench_engine.py to run in a process of its own (so each
engine has the GPU to itself): `python bench/vllm_engine.py MODEL_DIR WORKLOAD.json` prints one
JSON line {"seconds": ..., "tokens": ..., "version": ...}. vLLM runs at its defaults (CUDA
graphs and torch.compile on), greedy, EOS ignored, the prompts given as token ids."""
import json
import sys
import time


def main(folder, workload_path):
    import vllm
    from vllm.inputs import TokensPrompt

    with open(workload_path) as f:
        requests = json.load(f)
    llm = vllm.LLM(model=folder, dtype="bfloat16", seed=0,
                   max_model_len=max(len(p) + o for p, o in requests) + 16)
    params = [vllm.SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in requests]
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    llm.generate(prompts[:8], [vllm.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)] * 8,
                 use_tqdm=False)  # warm-up, as pagedlm's
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({"seconds": seconds, "tokens": tokens, "version": vllm.__version__}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
