"""FP8 KV cache accuracy on the shipped tiny model's held-out tokens: perplexity with each KV
cache dtype (relative increase over the same weights with a 16/32-bit cache), teacher-forced
top-1 agreement, and greedy-generation agreement with the non-FP8 engine.

    python tools/fp8_accuracy.py [--device cpu] [--sequences 16] [--gen-prompts 8] [--gen-tokens 64]

Perplexity runs each held-out sequence through the engine's model and paged KV cache in chunks of
--chunk tokens (every chunk's queries read the keys and values of the earlier chunks back from
the cache, quantized), so it measures the cache, not only the model."""
import argparse
import math

import numpy as np
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.data import tiny_model
from pagedlm.models import AttentionBatch


def sequence_logprobs(llm, tokens, chunk):
    """log p(tokens[i+1] | tokens[:i+1]) for every i, and the argmax token there."""
    model, caches, device = llm.model, llm.kv_caches, llm.device
    block_size = caches[0][0].shape[1]
    n = len(tokens)
    blocks = -(-n // block_size)
    table = torch.arange(blocks, dtype=torch.int32, device=device).view(1, -1)
    logprobs, hits = [], []
    ids = torch.tensor(tokens, dtype=torch.int64, device=device)
    for start in range(0, n - 1, chunk):
        stop = min(start + chunk, n - 1)
        positions = torch.arange(start, stop, device=device)
        batch = AttentionBatch(slot_mapping=positions.clone(), block_tables=table,
                               seq_lens=torch.tensor([stop], dtype=torch.int32, device=device),
                               cu_seqlens_q=torch.tensor([0, stop - start], dtype=torch.int32, device=device),
                               decode_only=False)
        logits = model(ids[start:stop], positions, batch, caches).float()
        lp = torch.log_softmax(logits, -1)
        targets = ids[start + 1:stop + 1]
        logprobs.append(lp.gather(1, targets.view(-1, 1)).view(-1).double().cpu())
        hits.append(lp.argmax(-1).cpu())
    return torch.cat(logprobs), torch.cat(hits)


def evaluate(llm, held, chunk):
    total, count, argmax = 0.0, 0, []
    for row in held:
        lp, hit = sequence_logprobs(llm, [int(t) for t in row], chunk)
        total += -lp.sum().item()
        count += lp.numel()
        argmax.append(hit)
    return math.exp(total / count), torch.cat(argmax)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sequences", type=int, default=16, help="held-out sequences for perplexity")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--gen-prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=64)
    args = parser.parse_args()

    folder = tiny_model("target")
    held = np.load(folder.parent / "heldout.npy")[:args.sequences]
    prompts = [[int(t) for t in row[:args.prompt_tokens]] for row in held[:args.gen_prompts]]
    greedy = SamplingParams(temperature=0, max_tokens=args.gen_tokens, ignore_eos=True)
    weight_dtypes = ["float32", "bfloat16"]
    configs = [("auto", False), ("fp8", False), ("fp8", True), ("fp8_e5m2", False), ("fp8_e5m2", True)]
    print(f"model {folder}, device {args.device}, {len(held)} held-out sequences x {held.shape[1]} tokens, "
          f"greedy: {len(prompts)} prompts x {args.prompt_tokens} tokens -> {args.gen_tokens} tokens")
    print(f"{'weights':9} {'kv cache':22} {'ppl':>9} {'ppl +%':>8} {'top-1 agree':>11} {'greedy tok agree':>16} "
          f"{'greedy exact':>12} {'first diff':>10}")
    for weights in weight_dtypes:
        base_ppl = base_hits = base_gen = None
        for kv, calc in configs:
            llm = LLM(str(folder), device=args.device, dtype=weights, kv_cache_dtype=kv, calculate_kv_scales=calc,
                      num_blocks=256, enable_prefix_caching=False,
                      enforce_eager=True)
            outs = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            ppl, hits = evaluate(llm, held, args.chunk)
            name = f"{kv}{' +measured' if calc else ''}" if kv != "auto" else f"auto ({weights})"
            if base_ppl is None:
                base_ppl, base_hits, base_gen = ppl, hits, outs
                print(f"{weights:9} {name:22} {ppl:9.4f} {'-':>8} {'-':>11} {'-':>16} {'-':>12} {'-':>10}")
                continue
            top1 = (hits == base_hits).float().mean().item()
            same = [np.array(a) == np.array(b) for a, b in zip(outs, base_gen)]
            tok_agree = float(np.mean([s.mean() for s in same]))
            exact = sum(bool(s.all()) for s in same)
            first = [int(np.argmin(s)) if not s.all() else len(s) for s in same]
            print(f"{weights:9} {name:22} {ppl:9.4f} {100 * (ppl / base_ppl - 1):+8.3f} {top1:11.4f} "
                  f"{tok_agree:16.4f} {exact:>5}/{len(same):<6} {np.mean(first):10.1f}")
    print("ppl +%: relative perplexity increase over the same weights with a 16/32-bit (auto) cache. "
          "top-1 agree: share of held-out positions (teacher-forced) whose argmax token is the auto cache's. "
          "greedy: token-by-token agreement with the auto cache's greedy continuations, sequences identical, "
          "mean position of the first difference.")


if __name__ == "__main__":
    main()
