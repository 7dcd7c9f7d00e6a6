"""tools/train_tiny.py: its parameter counts are pagedlm.scaling's, its sweep plan fits the GPU
job's clock, and its --smoke run goes through the whole pipeline (corpus, tokenizer, target +
draft, sweep; the sweep alone on the shipped tokenizer) in seconds on a CPU."""
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.models import load_model
from pagedlm.scaling import ModelConfig, count_params, non_embedding_params

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from tiny.models import Shape, llama_config  # noqa: E402
from tiny.plan import LADDER, SMOKE, Plan, sweep_runs  # noqa: E402

SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "python" / "pagedlm" / "data" / "tiny-code" / "target" / "tokenizer.json"


@pytest.mark.parametrize("shape", LADDER + [Plan().target, Plan().draft], ids=lambda s: s.name())
def test_parameter_counts_follow_pagedlm_scaling(shape):
    config = llama_config(shape, 4096, 512)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    scaling_config = ModelConfig.from_hf(config.to_dict())
    assert shape.params(4096) == count_params(scaling_config) == sum(p.numel() for p in model.parameters())
    assert shape.non_embedding_params(4096) == non_embedding_params(scaling_config)


def test_shipped_pair_fits_the_size_limit():
    plan = Plan()
    assert plan.target.params(plan.vocab) >= 4 * plan.draft.params(plan.vocab)
    assert 2 * (plan.target.params(plan.vocab) + plan.draft.params(plan.vocab)) < 23e6  # bf16, tokenizers beside


def test_sweep_plan_is_a_grid_that_fits_its_clock():
    plan = Plan()
    runs = sweep_runs(plan)
    assert len(plan.sweep) >= 3 and all(len(shapes) >= 5 for shapes in plan.sweep.values())
    for _, shape, tokens, batch, _ in runs:
        assert tokens / (batch * plan.seq_len) >= plan.sweep_min_steps or batch == plan.sweep_batch_range[0]
    # ~12 s of corpus and tokens before the sweep, and 10% of slack for the estimate
    assert 12 + 1.1 * sum(r[4] for r in runs) + plan.reserve_s <= plan.time_limit_s


@pytest.mark.skipif(not SHIPPED_TOKENIZER.is_file(), reason="no shipped tokenizer")
def test_smoke_sweep_on_the_shipped_tokenizer(tmp_path):
    import train_tiny

    threads = torch.get_num_threads()
    try:
        assert train_tiny.main(["--out", str(tmp_path), "--smoke", "--device", "cpu", "--mode", "sweep",
                                "--tokenizer", str(SHIPPED_TOKENIZER)]) == 0
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == sum(len(shapes) for shapes in SMOKE.sweep.values())
    assert all(int(row["N"]) == Shape(int(row["d_model"]), int(row["layers"])).params(4096) for row in rows)
    assert (tmp_path / "tokenizer.json").read_bytes() == SHIPPED_TOKENIZER.read_bytes()


def test_smoke_run_makes_loadable_models_and_a_sweep(tmp_path):
    import train_tiny

    threads = torch.get_num_threads()
    try:
        assert train_tiny.main(["--out", str(tmp_path), "--smoke", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)  # the trainer runs these tiny models on one thread
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    vocab = json.loads((tmp_path / "tiny-code" / "target" / "config.json").read_text())["vocab_size"]
    assert len(rows) == sum(len(shapes) for shapes in SMOKE.sweep.values())
    for row in rows:
        assert float(row["flops"]) == pytest.approx(6 * float(row["N"]) * float(row["D"]))
        # Trained, not merely finite: below the loss of a uniform guess over the vocabulary.
        assert 0 < float(row["loss"]) < math.log(vocab)
    manifest = json.loads((tmp_path / "tiny-code" / "manifest.json").read_text())
    assert manifest["origins"]["stdlib"]["licence"] == "PSF-2.0" and manifest["held_out_files"] > 0

    folder = tmp_path / "tiny-code" / "target"
    record = json.loads((folder / "training.json").read_text())
    assert record["params"] == sum(p.numel() for p in load_model(folder).parameters())
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = torch.from_numpy(np.load(tmp_path / "tiny-code" / "heldout.npy").astype(np.int64))
    with torch.no_grad():
        logits = reference(windows[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:])
    assert float(loss) == pytest.approx(record["shipped_sample_loss"], abs=0.05)  # bf16 there, fp32 here
    prompt = windows[0, :20].tolist()
    greedy = LLM(folder, device="cpu").generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                                use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert greedy == expected[0, len(prompt):].tolist()
    draft = json.loads((tmp_path / "tiny-code" / "draft" / "training.json").read_text())
    assert 0 <= draft["greedy_agreement_with_target"] <= 1 and draft["params"] < record["params"]
