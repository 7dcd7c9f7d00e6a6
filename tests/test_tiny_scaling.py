"""The scaling law measured on pagedlm's own runs (docs/tiny-code/runs.csv, made by
tools/tiny_sweep_gpu.sh; law.json by `pagedlm scaling fit --runs ... --json ...`): the sweep is a real
isoFLOP grid, and fitting the committed runs again recovers the committed law."""
import json
from pathlib import Path

import numpy as np
import pytest

from pagedlm.scaling import ChinchillaLaw, fit_chinchilla
from pagedlm.scaling.plot import read_runs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "tiny-code"

if not (DOCS / "runs.csv").is_file() or not (DOCS / "law.json").is_file():
    pytest.skip(f"{DOCS} holds no runs.csv and law.json yet: tools/tiny_sweep_gpu.sh makes the runs on a GPU machine",
                allow_module_level=True)


def test_sweep_is_an_isoflop_grid():
    runs = read_runs(DOCS / "runs.csv")
    budgets = np.unique(runs["budget"])
    assert len(budgets) >= 3
    for budget in budgets:
        assert len(np.unique(runs["N"][runs["budget"] == budget])) >= 5
    np.testing.assert_allclose(runs["flops"], 6 * runs["N"] * runs["D"], rtol=1e-6)


def test_fit_recovers_the_committed_law():
    runs = read_runs(DOCS / "runs.csv")
    committed = json.loads((DOCS / "law.json").read_text())
    law = ChinchillaLaw(**{k: committed[k] for k in ("E", "A", "B", "alpha", "beta")})
    fit = fit_chinchilla(runs["N"], runs["D"], runs["loss"], n_starts=30)
    assert fit.alpha == pytest.approx(law.alpha, abs=0.02) and fit.beta == pytest.approx(law.beta, abs=0.02)
    np.testing.assert_allclose(fit.loss(runs["N"], runs["D"]), law.loss(runs["N"], runs["D"]), rtol=0.005)
    for budget in np.unique(runs["budget"]):
        assert fit.optimal(budget)[0] == pytest.approx(law.optimal(budget)[0], rel=0.1)
