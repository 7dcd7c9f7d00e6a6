"""Speculative verification: decide which drafted tokens a target model accepts, for chains
(one draft sequence per row) and token trees (Medusa, EAGLE, SpecInfer, lookahead), greedily
or by lossless speculative sampling. Also registered as torch.ops.pagedlm.verify_*.

Random numbers come from Philox-4x32-10 keyed by (seed, offset, row, position), so a result
is a pure function of the inputs and bit-identical on CPU and CUDA. Shapes, dtypes and
devices are always checked; token ids, lengths and parents inside CUDA tensors only when
PAGEDLM_DEBUG=1 (reading them costs a synchronization); CUDA kernels never read out of bounds
(an out-of-range draft token counts as rejected, an out-of-range parent as padding).
"""

import torch

from pagedlm import _C
from pagedlm._torch_glue import debug_checks, expect_tensors, stream_of

__all__ = ["verify_greedy", "verify_speculative", "verify_tree_greedy", "verify_tree_speculative"]

_UINT64 = (1 << 64) - 1


def _as_uint64(name, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not -(1 << 63) <= value <= _UINT64:
        raise ValueError(f"{name}: {value} does not fit in 64 bits")
    return value & _UINT64


def _offset_args(offset, device):
    """(offset int, offset tensor or None): a tensor on the inputs' CUDA device is read by the
    kernel, so CUDA-graph replays see it advance; a CPU tensor is read here."""
    if not isinstance(offset, torch.Tensor):
        return _as_uint64("offset", offset), None
    if offset.numel() != 1 or offset.dtype != torch.int64:
        raise ValueError(f"offset: a tensor offset must be one int64 element, got {offset.dtype} {tuple(offset.shape)}")
    if offset.device.type == "cpu" and device.type != "cpu":
        return int(offset) & _UINT64, None
    return 0, offset.reshape(1)


def _tree_width(tree_tokens, parents, target, max_depth):
    """Columns of accepted_nodes: max_depth + 1 if given; else computed from parents on the CPU
    (where the values are at hand); else the node count T, since reading CUDA values would sync.
    Badly shaped inputs get T, and the binding's checks name the argument."""
    if tree_tokens.dim() != 2:
        raise ValueError(f"tree_tokens: expected 2 dimensions, got shape {tuple(tree_tokens.shape)}")
    nodes = tree_tokens.shape[1]
    if max_depth is not None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
            raise ValueError(f"max_depth: must be a non-negative int, got {max_depth!r}")
        return min(max_depth, max(nodes - 1, 0)) + 1
    shapes_ok = parents.shape == tree_tokens.shape and target.dim() == 3 and target.shape[:2] == tree_tokens.shape
    if shapes_ok and nodes > 0 and not (tree_tokens.is_cuda or parents.is_cuda or target.is_cuda):
        return _C.tree_max_depth(tree_tokens, parents, target.shape[2]) + 1
    return max(nodes, 1)


def _chain_outputs(draft_tokens):
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens: expected 2 dimensions, got shape {tuple(draft_tokens.shape)}")
    batch, k = draft_tokens.shape
    return (torch.empty(batch, k + 1, dtype=torch.int64, device=draft_tokens.device),
            torch.empty(batch, dtype=torch.int32, device=draft_tokens.device))


def _tree_outputs(tree_tokens, width):
    batch = tree_tokens.shape[0]
    device = tree_tokens.device
    return (torch.empty(batch, width, dtype=torch.int32, device=device),
            torch.empty(batch, dtype=torch.int32, device=device),
            torch.empty(batch, dtype=torch.int64, device=device))


def _check_cuda_chain_values(draft_tokens, draft_lens, vocab):
    if debug_checks() and draft_tokens.is_cuda and draft_tokens.dim() == 2:
        _C.check_chain_values(draft_tokens.cpu(), None if draft_lens is None else draft_lens.cpu(), vocab)


def verify_greedy(draft_tokens, target_logits, *, draft_lens=None):
    """Greedy chain verification: draft i is accepted while it equals argmax(target_logits[:, i])
    (NaN ranks lowest, the lowest index wins ties); the row then emits the target's argmax at
    the first mismatch, or the bonus argmax after its last draft.

    draft_tokens int64 [B, k]; target_logits [B, k+1, V] f32, f16 or bf16; draft_lens int32 [B]
    (values in [0, k]) for ragged drafts. Returns (output_tokens int64 [B, k+1] padded with -1,
    num_accepted int32 [B]); row b emits output_tokens[b, :num_accepted[b] + 1].
    """
    expect_tensors(draft_tokens=draft_tokens, target_logits=target_logits, draft_lens=draft_lens)
    vocab = target_logits.shape[-1] if target_logits.dim() == 3 else 0
    _check_cuda_chain_values(draft_tokens, draft_lens, vocab)
    output_tokens, num_accepted = _chain_outputs(draft_tokens)
    _C.verify_greedy(draft_tokens, target_logits, draft_lens, output_tokens, num_accepted, stream_of(target_logits))
    return output_tokens, num_accepted


def verify_speculative(draft_tokens, draft_probs, target_probs, *, seed, offset=0, draft_lens=None):
    """Speculative-sampling chain verification (Leviathan et al. 2023, Chen et al. 2023):
    draft x at position i is accepted when u < p_i(x) / q_i(x); at the first rejection the row
    emits a sample from norm(max(0, p_i - q_i)) and stops; with every draft accepted, a bonus
    sample from p at the position after the last draft. The emitted tokens are distributed
    exactly as sampling from the target alone, provided the drafts were sampled from q.

    draft_tokens int64 [B, k]; draft_probs f32 [B, k, V], or None for a deterministic draft
    (one-hot q); target_probs f32 [B, k+1, V]; draft_lens int32 [B] for ragged drafts.
    seed: int (64 bits); offset: int, or a one-element int64 tensor (on the inputs' CUDA device
    it is read by the kernel, so a CUDA-graph replay can advance it). Same inputs, seed and
    offset give the same tokens on CPU and CUDA.

    Degenerate rows never give NaN or out-of-range ids: q(x) = 0 rejects; p = q always accepts;
    a residual that sums to zero (probabilities are compared in fixed point, 2^-40 units)
    samples from p instead, and a p with no mass at all gives token 0.
    Returns (output_tokens int64 [B, k+1] padded with -1, num_accepted int32 [B]).
    """
    expect_tensors(draft_tokens=draft_tokens, draft_probs=draft_probs, target_probs=target_probs,
                    draft_lens=draft_lens)
    offset_value, offset_tensor = _offset_args(offset, target_probs.device)
    return _speculative(draft_tokens, draft_probs, target_probs, _as_uint64("seed", seed), offset_value, offset_tensor,
                        draft_lens)


def _speculative(draft_tokens, draft_probs, target_probs, seed, offset, offset_tensor, draft_lens):
    vocab = target_probs.shape[-1] if target_probs.dim() == 3 else 0
    _check_cuda_chain_values(draft_tokens, draft_lens, vocab)
    output_tokens, num_accepted = _chain_outputs(draft_tokens)
    _C.verify_speculative(draft_tokens, draft_probs, target_probs, draft_lens, seed & _UINT64, offset & _UINT64,
                          offset_tensor, output_tokens, num_accepted, stream_of(target_probs))
    return output_tokens, num_accepted


def verify_tree_greedy(tree_tokens, parents, target_logits, *, max_depth=None):
    """Greedy token-tree verification. Node 0 is the root (the last emitted token), parents[b, 0]
    = -1, every other node's parent an earlier node, or -1 to mark a padding node (not in the
    tree). From the root, the walk descends into the first child (ascending node index) whose
    token equals argmax(target_logits[b, node]) and stops when none does.

    tree_tokens int64 [B, T]; parents int32 [B, T]; target_logits [B, T, V] f32, f16 or bf16.
    Returns (accepted_nodes int32 [B, W] padded with -1, node 0 first; num_accepted int32 [B],
    the accepted nodes below the root; next_token int64 [B], the argmax at the last accepted
    node). W = max_depth + 1: with max_depth given the walk stops after max_depth nodes; else
    on CPU it is the trees' real depth + 1, and on CUDA T (finding the depth there would
    synchronize).
    """
    expect_tensors(tree_tokens=tree_tokens, parents=parents, target_logits=target_logits)
    vocab = target_logits.shape[-1] if target_logits.dim() == 3 else 0
    width = _tree_width(tree_tokens, parents, target_logits, max_depth)
    _check_cuda_tree_values(tree_tokens, parents, vocab)
    outputs = _tree_outputs(tree_tokens, width)
    _C.verify_tree_greedy(tree_tokens, parents, target_logits, *outputs, stream_of(target_logits))
    return outputs


def verify_tree_speculative(tree_tokens, parents, target_probs, *, seed, offset=0, max_depth=None):
    """Lossless speculative token-tree verification for deterministic children (SpecInfer's
    multi-candidate rule). At node u, P = p_u; the children are tried in ascending node index:
    child c is accepted when r < P(token_c) / sum(P) (r a fresh uniform per try), after which
    the walk continues at c; otherwise P(token_c) = 0 and the next child is tried. With no
    child accepted the emitted token is sampled from what is left of P; at a leaf it is the
    bonus, sampled from p there. The emitted sequence is distributed as the target's own.

    Tree layout and outputs as verify_tree_greedy; target_probs f32 [B, T, V]; seed and offset
    as verify_speculative.
    """
    expect_tensors(tree_tokens=tree_tokens, parents=parents, target_probs=target_probs)
    offset_value, offset_tensor = _offset_args(offset, target_probs.device)
    return _tree_speculative(tree_tokens, parents, target_probs, _as_uint64("seed", seed), offset_value,
                             offset_tensor, max_depth)


def _tree_speculative(tree_tokens, parents, target_probs, seed, offset, offset_tensor, max_depth):
    vocab = target_probs.shape[-1] if target_probs.dim() == 3 else 0
    width = _tree_width(tree_tokens, parents, target_probs, max_depth)
    _check_cuda_tree_values(tree_tokens, parents, vocab)
    outputs = _tree_outputs(tree_tokens, width)
    _C.verify_tree_speculative(tree_tokens, parents, target_probs, seed & _UINT64, offset & _UINT64, offset_tensor,
                               *outputs, stream_of(target_probs))
    return outputs


def _check_cuda_tree_values(tree_tokens, parents, vocab):
    if debug_checks() and tree_tokens.is_cuda and parents.shape == tree_tokens.shape and tree_tokens.shape[1] > 0:
        _C.tree_max_depth(tree_tokens.cpu(), parents.cpu(), vocab)


# ---- torch.library registration ------------------------------------------------------
# FRAGMENT, not DEF: pagedlm.ops owns the namespace's DEF library, and either module may be
# imported first.
_lib = torch.library.Library("pagedlm", "FRAGMENT")
_lib.define("verify_greedy(Tensor draft_tokens, Tensor target_logits, *, Tensor? draft_lens=None) "
            "-> (Tensor, Tensor)")
_lib.define("verify_speculative(Tensor draft_tokens, Tensor? draft_probs, Tensor target_probs, *, int seed, "
            "int offset=0, Tensor? offset_tensor=None, Tensor? draft_lens=None) -> (Tensor, Tensor)")
_lib.define("verify_tree_greedy(Tensor tree_tokens, Tensor parents, Tensor target_logits, *, int? max_depth=None) "
            "-> (Tensor, Tensor, Tensor)")
_lib.define("verify_tree_speculative(Tensor tree_tokens, Tensor parents, Tensor target_probs, *, int seed, "
            "int offset=0, Tensor? offset_tensor=None, int? max_depth=None) -> (Tensor, Tensor, Tensor)")


def _speculative_op(draft_tokens, draft_probs, target_probs, *, seed, offset=0, offset_tensor=None, draft_lens=None):
    if offset_tensor is not None:
        offset, offset_tensor = _offset_args(offset_tensor, target_probs.device)
    return _speculative(draft_tokens, draft_probs, target_probs, seed, offset, offset_tensor, draft_lens)


def _tree_speculative_op(tree_tokens, parents, target_probs, *, seed, offset=0, offset_tensor=None, max_depth=None):
    if offset_tensor is not None:
        offset, offset_tensor = _offset_args(offset_tensor, target_probs.device)
    return _tree_speculative(tree_tokens, parents, target_probs, seed, offset, offset_tensor, max_depth)


for _key in ("CPU", "CUDA"):
    _lib.impl("verify_greedy", verify_greedy, _key)
    _lib.impl("verify_speculative", _speculative_op, _key)
    _lib.impl("verify_tree_greedy", verify_tree_greedy, _key)
    _lib.impl("verify_tree_speculative", _tree_speculative_op, _key)


def _fake_chain(draft_tokens):
    batch, k = draft_tokens.shape
    return (draft_tokens.new_empty(batch, k + 1, dtype=torch.int64), draft_tokens.new_empty(batch, dtype=torch.int32))


def _fake_tree(tree_tokens, max_depth):
    batch, nodes = tree_tokens.shape
    if max_depth is not None:
        width = min(max_depth, nodes - 1) + 1
    elif tree_tokens.device.type == "cpu":
        width = torch.library.get_ctx().new_dynamic_size(min=1)  # the trees' depth + 1
    else:
        width = nodes
    return (tree_tokens.new_empty(batch, width, dtype=torch.int32), tree_tokens.new_empty(batch, dtype=torch.int32),
            tree_tokens.new_empty(batch, dtype=torch.int64))


@torch.library.register_fake("pagedlm::verify_greedy")
def _(draft_tokens, target_logits, *, draft_lens=None):
    return _fake_chain(draft_tokens)


@torch.library.register_fake("pagedlm::verify_speculative")
def _(draft_tokens, draft_probs, target_probs, *, seed, offset=0, offset_tensor=None, draft_lens=None):
    return _fake_chain(draft_tokens)


@torch.library.register_fake("pagedlm::verify_tree_greedy")
def _(tree_tokens, parents, target_logits, *, max_depth=None):
    return _fake_tree(tree_tokens, max_depth)


@torch.library.register_fake("pagedlm::verify_tree_speculative")
def _(tree_tokens, parents, target_probs, *, seed, offset=0, offset_tensor=None, max_depth=None):
    return _fake_tree(tree_tokens, max_depth)
