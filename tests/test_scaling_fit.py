"""fit_chinchilla recovers a known law from noisy synthetic runs."""
import numpy as np
import pytest
from scipy.optimize import check_grad

from pagedlm.scaling import CHINCHILLA, EPOCH_2024, fit_chinchilla
from pagedlm.scaling.fit import _objective


def synthetic_runs(law, noise, seed):
    """An 8 x 8 grid of runs, 30M-10B parameters on 1B-500B tokens, with log-normal loss noise."""
    rng = np.random.default_rng(seed)
    N, D = (x.ravel() for x in np.meshgrid(np.logspace(7.5, 10, 8), np.logspace(9, 11.7, 8)))
    return N, D, law.loss(N, D) * np.exp(rng.normal(0.0, noise, N.size))


@pytest.mark.parametrize("law, seed", [(CHINCHILLA, 0), (EPOCH_2024, 1)])
def test_fit_recovers_known_constants_from_noisy_runs(law, seed):
    N, D, L = synthetic_runs(law, noise=0.003, seed=seed)
    fit = fit_chinchilla(N, D, L, n_starts=30)
    assert fit.E == pytest.approx(law.E, abs=0.03)
    assert fit.alpha == pytest.approx(law.alpha, abs=0.02)
    assert fit.beta == pytest.approx(law.beta, abs=0.02)
    # A and B trade off against the exponents; what matters downstream is the allocation.
    for C in (1e20, 1e22, 1e24):
        assert fit.optimal(C)[0] == pytest.approx(law.optimal(C)[0], rel=0.15)
        assert fit.loss(1e9, 2e10) == pytest.approx(law.loss(1e9, 2e10), rel=0.005)


def test_fit_on_exact_runs_is_exact_with_a_paper_style_grid():
    N, D, L = synthetic_runs(CHINCHILLA, noise=0.0, seed=0)
    grid = {"alpha": (0.0, 1.0), "beta": (0.0, 1.0), "e": (-1.0, 1.0), "a": (0.0, 10.0), "b": (0.0, 10.0)}
    fit = fit_chinchilla(N, D, L, grid=grid)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(getattr(CHINCHILLA, name), rel=1e-3), name


def test_objective_gradient_matches_finite_differences():
    N, D, L = synthetic_runs(CHINCHILLA, noise=0.01, seed=3)
    args = (np.log(N), np.log(D), np.log(L), 1e-3)
    for theta in ([6.0, 6.0, 0.5, 0.34, 0.28], [3.0, 9.0, -0.5, 0.2, 0.5]):
        theta = np.array(theta)
        value, grad = _objective(theta, *args)
        error = check_grad(lambda t: _objective(t, *args)[0], lambda t: _objective(t, *args)[1], theta)
        assert error <= 1e-5 * np.linalg.norm(grad)


def test_bad_runs_are_named():
    N, D, L = synthetic_runs(CHINCHILLA, noise=0.0, seed=0)
    with pytest.raises(ValueError, match="same length"):
        fit_chinchilla(N, D[:-1], L)
    with pytest.raises(ValueError, match="L"):
        fit_chinchilla(N, D, -L)
    with pytest.raises(ValueError, match="at least 5"):
        fit_chinchilla(N[:3], D[:3], L[:3])
    with pytest.raises(ValueError, match="grid"):
        fit_chinchilla(N, D, L, grid={"alpha": (0.5,)})
