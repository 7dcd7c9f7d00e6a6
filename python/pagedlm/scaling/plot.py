"""IsoFLOP figure: loss against model size at fixed compute, and the compute-optimal frontier.

Optionally overlays measured runs (CSV with columns N, D, flops, loss, and optionally budget:
the nominal FLOPs that groups runs stopped short of it) and the law fitted to them.
matplotlib (the `plot` extra) is imported only here, inside the functions, and drawn with the
Agg canvas so no display or global pyplot state is touched.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from .fit import fit_chinchilla
from .laws import CHINCHILLA, ChinchillaLaw

RUN_COLUMNS = ("N", "D", "flops", "loss")


def read_runs(path) -> dict[str, np.ndarray]:
    """Columns N, D, flops, loss (and budget, when present) of a CSV of training runs, as float arrays."""
    try:
        with open(os.fspath(path), newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ValueError(f"runs: cannot read {path} ({err.strerror})") from None
    if not rows:
        raise ValueError(f"runs: {path} has no rows")
    missing = [c for c in RUN_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"runs: {path} lacks column(s) {', '.join(missing)}; need {', '.join(RUN_COLUMNS)}")
    try:
        return {c: np.array([float(r[c]) for r in rows]) for c in RUN_COLUMNS + ("budget",) if c in rows[0]}
    except ValueError as err:
        raise ValueError(f"runs: {path} has a value that is not a number ({err})") from None


def plot_isoflops(out, *, law: ChinchillaLaw = CHINCHILLA, budgets=None, runs=None, n_starts: int = 100):
    """Write the figure to `out` (format from its extension) and return the law drawn.

    With `runs` (a CSV path or a dict of arrays), the law drawn is the one fitted to the runs
    (fit_chinchilla with n_starts starts), its isoFLOP curves at the runs' own budgets.
    """
    from pagedlm._extras import import_extra
    import_extra("matplotlib", "plot", "pagedlm scaling plot")
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if runs is not None:
        runs = read_runs(runs) if isinstance(runs, (str, os.PathLike)) else runs
        law = fit_chinchilla(runs["N"], runs["D"], runs["loss"], n_starts=n_starts)
        group = runs.get("budget", runs["flops"])
        budgets = np.unique(group) if budgets is None else budgets
    budgets = np.logspace(18, 24, 7) if budgets is None else np.asarray(budgets, dtype=float)

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    curves, frontier = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    colors = [colormaps["viridis"](i / max(1, len(budgets) - 1)) for i in range(len(budgets))]
    n_opt, d_opt, l_opt = law.optimal(budgets)
    for C, color, n_star, l_star in zip(budgets, colors, n_opt, l_opt, strict=True):
        n = n_star * np.logspace(-1.5, 1.5, 200)  # N_opt / 30 .. N_opt * 30
        curves.plot(n, law.loss(n, C / (6 * n)), color=color, label=f"{C:.1e} FLOPs")
        curves.plot([n_star], [l_star], "o", color=color)
        if runs is not None:
            here = np.isclose(group, C)
            curves.scatter(runs["N"][here], runs["loss"][here], marker="x", color=color, zorder=3)
    curves.plot(n_opt, l_opt, "k--", lw=1, label="compute-optimal")
    curves.set(xscale="log", xlabel="parameters N", ylabel="loss (nats/token)",
               title="IsoFLOP curves" + (" (x: measured runs)" if runs is not None else ""))
    curves.legend(fontsize=7)

    c_line = np.logspace(np.log10(budgets.min()) - 1, np.log10(budgets.max()) + 2, 100)
    n_line, d_line, _ = law.optimal(c_line)
    frontier.plot(c_line, n_line, label="N_opt (parameters)")
    frontier.plot(c_line, d_line, label="D_opt (tokens)")
    if runs is not None:  # the best measured run of each budget
        best = [np.flatnonzero(np.isclose(group, C))[np.argmin(runs["loss"][np.isclose(group, C)])] for C in budgets]
        frontier.scatter(budgets, runs["N"][best], marker="x", color="C0", zorder=3, label="lowest-loss run: N")
        frontier.scatter(budgets, runs["D"][best], marker="x", color="C1", zorder=3, label="lowest-loss run: D")
    frontier.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)",
                 title=f"Frontier: {law.name or 'law'} E={law.E:.3g} A={law.A:.4g} B={law.B:.4g} "
                       f"alpha={law.alpha:.3g} beta={law.beta:.3g}")
    frontier.title.set_fontsize(8)
    frontier.legend(fontsize=8)
    fig.savefig(os.fspath(out), dpi=120)
    return law
