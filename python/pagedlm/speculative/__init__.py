"""Speculative decoding on the engine: LLM(model, speculative={"method": ...}).

Methods (each in its own module): "ngram" (prompt lookup), "draft" (a smaller model with its
own paged cache), "jacobi" (a window of guesses iterated to its fixed point) and "lookahead"
(2-D Jacobi window, n-gram pool, verification trie in one forward). All are lossless: greedy
requests emit exactly plain greedy decoding's tokens, sampled ones the target's distribution.
Every method also takes "adaptive" (default True): the engine-wide switch of pay_switch.py.
"lookahead" also takes "pool_from_prompt" (default True): the sequence's own n-grams join its pool.
"""
from pagedlm.speculative.draft_model import DraftModelProposer
from pagedlm.speculative.jacobi import JacobiProposer
from pagedlm.speculative.lookahead import LookaheadProposer
from pagedlm.speculative.ngram import NgramProposer
from pagedlm.speculative.speculator import Speculator

__all__ = ["Speculator", "check_config", "make_speculator"]

_KEYS = {"ngram": {"num_tokens", "max_ngram"}, "draft": {"model", "num_tokens"}, "jacobi": {"num_tokens"},
         "lookahead": {"window", "ngram", "guesses"}}


def check_config(config):
    """ValueError naming the key of a `speculative` dict that is wrong."""
    if not isinstance(config, dict) or config.get("method") not in _KEYS:
        raise ValueError(f"speculative: expected a dict with method in {sorted(_KEYS)}, got {config!r}")
    method = config["method"]
    flags = {"adaptive"} | ({"pool_from_prompt"} if method == "lookahead" else set())  # optional True/False keys
    given = set(config) - {"method"} - flags
    if given != _KEYS[method]:
        raise ValueError(f"speculative: method {method!r} takes keys {sorted(_KEYS[method])} (and optionally "
                         f"{sorted(flags)}), got {sorted(set(config) - {'method'})}")
    for flag in flags & set(config):
        if not isinstance(config[flag], bool):
            raise ValueError(f"speculative['{flag}']: must be True or False, got {config[flag]!r}")
    for key in [k for k in config if k in _KEYS[method] - {"model"}]:  # the int keys, in the given order
        value, smallest = config[key], 2 if key == "ngram" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(f"speculative['{key}']: must be an int >= {smallest}, got {value!r}")


def make_speculator(config, *, max_num_batched_tokens, draft_model=None, num_blocks=None, block_size=None,
                    device=None, use_cuda_graphs=False, max_num_seqs=256):
    """The Speculator a checked `speculative` dict asks for, over its method's proposer
    (draft_model: the loaded draft, for the draft method, whose cache has num_blocks blocks of
    block_size tokens on device, and which replays CUDA graphs with use_cuda_graphs)."""
    method = config["method"]
    if method == "ngram":
        proposer = NgramProposer(config["num_tokens"], config["max_ngram"])
    elif method == "jacobi":
        proposer = JacobiProposer(config["num_tokens"])
    elif method == "lookahead":
        proposer = LookaheadProposer(config["window"], config["ngram"], config["guesses"],
                                     config.get("pool_from_prompt", True))
    else:
        proposer = DraftModelProposer(draft_model, config["num_tokens"], num_blocks, block_size, device,
                                      use_cuda_graphs=use_cuda_graphs, max_num_seqs=max_num_seqs)
    return Speculator(proposer, max_num_batched_tokens, adaptive=config.get("adaptive", True))
