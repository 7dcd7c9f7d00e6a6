"""The code models shipped in pagedlm.data (made by tools/tiny_gpu.sh): they load in pagedlm and
transformers, pagedlm's greedy output is transformers', and the held-out loss and draft
agreement recorded in their folders are reproduced on the held-out sample shipped beside them."""
import json

import numpy as np
import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.data import TINY_CODE
from pagedlm.models import load_model
from pagedlm.models.loader import checkpoint_names

transformers = pytest.importorskip("transformers")

if not (TINY_CODE / "target" / "config.json").is_file():
    pytest.skip(f"{TINY_CODE} holds no shipped models yet: tools/tiny_gpu.sh makes them on a GPU machine",
                allow_module_level=True)

PROMPTS = ["def fibonacci(n):", "import os\n\n\nclass Config:\n    def __init__(self"]


def record(role):
    return json.loads((TINY_CODE / role / "training.json").read_text())


@pytest.fixture(scope="module")
def reference():
    return {role: transformers.AutoModelForCausalLM.from_pretrained(TINY_CODE / role, dtype=torch.float32).eval()
            for role in ("target", "draft")}


@pytest.fixture(scope="module")
def sample_logits(reference):
    """Logits of both models over the shipped held-out windows [n, seq_len + 1]."""
    windows = torch.from_numpy(np.load(TINY_CODE / "heldout.npy").astype(np.int64))
    with torch.no_grad():
        return windows, {role: model(windows[:, :-1]).logits for role, model in reference.items()}


def unigram_entropy(windows):
    """Nats per token of the held-out tokens' own frequencies: what a model that learned no
    context at all could reach at best."""
    counts = torch.bincount(windows[:, 1:].reshape(-1)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def heldout_losses(sample_logits, role):
    windows, logits = sample_logits
    return torch.nn.functional.cross_entropy(logits[role].transpose(1, 2), windows[:, 1:], reduction="none").mean(1)


def test_pair_is_within_the_package_budget(reference, sample_logits):
    files = [f for role in ("target", "draft") for f in (TINY_CODE / role).iterdir()]
    assert sum(f.stat().st_size for f in files) <= 24e6
    counted = {role: sum(p.numel() for p in reference[role].parameters()) for role in ("target", "draft")}
    assert counted["target"] >= 4 * counted["draft"]
    # Measured here, not read from the records: the larger model predicts the held-out code better,
    # and both beat the best context-free guess by a wide margin.
    target, draft = (float(heldout_losses(sample_logits, role).mean()) for role in ("target", "draft"))
    assert target < draft < unigram_entropy(sample_logits[0]) - 1.0


@pytest.mark.parametrize("role", ["target", "draft"])
def test_loads_in_pagedlm_and_transformers(role, reference):
    ours = load_model(TINY_CODE / role)
    theirs = dict(reference[role].named_parameters())
    for name, (p, rows) in checkpoint_names(ours).items():
        torch.testing.assert_close(p[rows], theirs[name], rtol=0, atol=0, msg=name)
    assert sum(p.numel() for p in ours.parameters()) == record(role)["params"]


def test_greedy_output_equals_transformers(reference):
    llm = LLM(TINY_CODE / "target", device="cpu", num_blocks=64)  # a 1 GiB default cache costs seconds to zero
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    for out in outputs:
        with torch.no_grad():
            expected = reference["target"].generate(torch.tensor([out.prompt_token_ids]), max_new_tokens=24,
                                                    min_new_tokens=24, do_sample=False)
        assert out.outputs[0].token_ids == expected[0, len(out.prompt_token_ids):].tolist()


@pytest.mark.parametrize("role", ["target", "draft"])
def test_heldout_loss_is_reproduced(role, sample_logits):
    windows, logits = sample_logits
    losses = torch.nn.functional.cross_entropy(logits[role].transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    shipped = record(role)
    # The same windows evaluated on the GPU in bf16: equal up to arithmetic.
    assert float(losses.mean()) == pytest.approx(shipped["shipped_sample_loss"], abs=0.02)
    # The whole held-out evaluation: equal up to the sampling noise of these few windows.
    noise = float(losses.std()) / len(losses) ** 0.5
    assert abs(float(losses.mean()) - shipped["heldout_loss"]) <= 4 * noise + 4 * shipped["heldout_loss_std_err"]


def test_draft_agrees_with_target_as_recorded(sample_logits):
    _, logits = sample_logits
    agreement = float((logits["draft"].argmax(-1) == logits["target"].argmax(-1)).double().mean())
    # The same windows on the GPU in bf16, where a few near-ties may break the other way.
    assert agreement == pytest.approx(record("draft")["shipped_sample_agreement"], abs=0.03)
    assert record("draft")["greedy_agreement_with_target"] >= 0.6  # the target, over all held-out windows


def test_cli_generates_code_with_no_arguments(capsys):
    from pagedlm.cli import main
    assert main(["generate", "--device", "cpu", "--max-tokens", "12"]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("def fibonacci(n):") and len(printed.out) > len("def fibonacci(n):") + 5
    assert "12 tokens, length" in printed.err


def test_no_data_file_ships_twice():
    import hashlib
    files = [f for f in TINY_CODE.parent.rglob("*") if f.is_file() and "__pycache__" not in f.parts]
    digests = {}
    for f in files:
        digests.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), []).append(f.relative_to(TINY_CODE.parent))
    assert [paths for paths in digests.values() if len(paths) > 1] == []
