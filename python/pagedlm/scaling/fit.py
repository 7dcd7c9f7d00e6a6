"""Fit a ChinchillaLaw to measured runs (N, D, final loss), as Hoffmann et al. 2022 fit Approach 3.

Minimise the Huber loss (delta 1e-3) between log L and the law's log-prediction, written in
log-sum-exp form LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, by
L-BFGS from every point of an initialisation grid, keeping the best (section 3.3, Appendix D.2).
"""
from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .laws import ChinchillaLaw

# Hoffmann et al. 2022, Appendix D.2: the grid of initialisations.
PAPER_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


def _as_positive_array(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0 or np.any(~np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be a non-empty sequence of positive finite numbers")
    return arr


def _objective(theta, log_n, log_d, log_l, delta):
    """Summed Huber loss / delta^2 and its gradient; theta = (a, b, e, alpha, beta).

    Dividing by delta^2 makes the objective about one per run instead of ~1e-6: L-BFGS-B's
    stopping tests are absolute below 1, and Besiroglu et al. 2024 trace Hoffmann et al.'s
    early-stopped fit to exactly that tiny scale (a mean-reduced Huber loss).
    """
    a, b, e, alpha, beta = theta
    t0, t1 = a - alpha * log_n, b - beta * log_d
    m = np.maximum(np.maximum(t0, t1), e)  # shift before exp so large a, b cannot overflow
    x0, x1, x2 = np.exp(t0 - m), np.exp(t1 - m), np.exp(e - m)
    total = x0 + x1 + x2
    r = m + np.log(total) - log_l
    small = np.abs(r) <= delta
    value = np.sum(np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))) / delta**2
    dr = np.where(small, r, delta * np.sign(r)) / (delta**2 * total)  # d value / d r, over the LSE's sum
    w0, w1, w2 = x0 * dr, x1 * dr, x2 * dr
    grad = np.array([w0.sum(), w1.sum(), w2.sum(), -(w0 * log_n).sum(), -(w1 * log_d).sum()])
    return value, grad


def fit_chinchilla(N, D, L, *, delta: float = 1e-3, grid: dict | None = None,
                   n_starts: int | None = None, progress: bool = False) -> ChinchillaLaw:
    """The ChinchillaLaw that best fits losses L of runs with N parameters and D tokens.

    `grid` maps 'alpha', 'beta', 'e', 'a', 'b' to initial values (default: the paper's 4,500
    starts, about a minute). `n_starts` keeps only that many starts, those whose initial
    objective is lowest: a speed-up the paper does not use, fine for clean data. `progress`
    shows a progress bar over the starts.
    """
    log_n, log_d, log_l = (np.log(_as_positive_array(k, v)) for k, v in (("N", N), ("D", D), ("L", L)))
    if not log_n.size == log_d.size == log_l.size:
        raise ValueError(f"N, D and L must have the same length, got {log_n.size}, {log_d.size}, {log_l.size}")
    if log_n.size < 5:
        raise ValueError(f"N, D, L: need at least 5 runs to fit 5 constants, got {log_n.size}")
    grid = PAPER_GRID if grid is None else grid
    missing = set(PAPER_GRID) - set(grid)
    if missing:
        raise ValueError(f"grid is missing {sorted(missing)}")
    args = (log_n, log_d, log_l, delta)
    starts = [np.array([a, b, e, alpha, beta]) for alpha, beta, e, a, b
              in itertools.product(*(grid[k] for k in ("alpha", "beta", "e", "a", "b")))]
    if n_starts is not None:
        starts.sort(key=lambda x0: _objective(x0, *args)[0])
        starts = starts[:n_starts]
    best = None
    # L-BFGS-B on five parameters gains nothing from BLAS threads, whose synchronisation can
    # make each iteration far slower on a busy machine.
    with threadpool_limits(1, user_api="blas"):
        for x0 in tqdm(starts, desc="fitting", unit=" starts", disable=not progress, leave=False):
            result = minimize(_objective, x0=x0, args=args, jac=True, method="L-BFGS-B", options={"maxiter": 1000})
            if best is None or result.fun < best.fun:
                best = result
    a, b, e, alpha, beta = best.x
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"L: the runs do not decrease with N and D (fit gave alpha={alpha:.3g}, beta={beta:.3g})")
    return ChinchillaLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                         beta=float(beta), name="fit")
