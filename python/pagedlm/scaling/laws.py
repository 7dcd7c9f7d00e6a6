"""Scaling laws: loss as a function of parameters N and training tokens D, and the
compute-optimal split of a FLOP budget C between them.

ChinchillaLaw is L = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, eq. 2), N counting all
parameters. KaplanLaw holds the constants of Kaplan et al. 2020, N counting non-embedding ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from . import validate

PF_DAY = 1e15 * 24 * 3600  # FLOPs in a petaflop/s-day, Kaplan et al.'s compute unit (8.64e19)


@dataclass(frozen=True)
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = ""

    def __post_init__(self):
        for field in ("E", "A", "B", "alpha", "beta"):
            validate.positive_number(field, getattr(self, field))

    def loss(self, N, D):
        """Expected loss (nats/token) of N parameters trained on D tokens; arrays broadcast."""
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def optimal(self, C):
        """(N_opt, D_opt, loss) minimising the loss under C = 6*N*D, in closed form
        (Hoffmann et al. 2022, eq. 4): N_opt = G (C/6)^a, D_opt = G^-1 (C/6)^b with
        G = (alpha A / (beta B))^(1/(alpha+beta)), a = beta/(alpha+beta), b = alpha/(alpha+beta)."""
        C = np.asarray(C, dtype=float)
        if np.any(~np.isfinite(C)) or np.any(C <= 0):
            raise ValueError(f"C must be positive and finite, got {C!r}")
        s = self.alpha + self.beta
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        N = G * (C / 6.0) ** (self.beta / s)
        D = (C / 6.0) ** (self.alpha / s) / G
        return N, D, self.loss(N, D)

    def optimal_numeric(self, C: float):
        """The same optimum found by minimising over log N with Brent's method; a check on the
        closed form, and the route for laws without one.

        It minimises log(loss - E), which has the same argmin: near the optimum the loss is flat
        and E dominates it, so differences in the loss itself vanish below float resolution.
        """
        C = validate.positive_number("C", C)
        # log(loss - E) is convex in log N (a log-sum-exp of two linear functions), so any bracket
        # holding the optimum will do; this one reaches far beyond N or D of one.
        bracket = math.log(C / 6.0) + 100.0

        def log_reducible_loss(log_n):
            n = math.exp(log_n)
            return math.log(self.A / n**self.alpha + self.B / (C / (6.0 * n)) ** self.beta)

        best = minimize_scalar(log_reducible_loss, bounds=(-bracket, bracket), method="bounded",
                               options={"xatol": 1e-12})
        N = math.exp(best.x)
        D = C / (6.0 * N)
        return N, D, float(self.loss(N, D))


# Hoffmann et al. 2022, section 3.3 (Approach 3), the rounded values printed in the paper body.
CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="chinchilla")
# Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt" (arXiv 2404.10102): their
# Approach-3 refit on data reconstructed from Hoffmann et al.'s Figure 4 (a = beta/(alpha+beta) = 0.51).
EPOCH_2024 = ChinchillaLaw(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, name="epoch2024")


@dataclass(frozen=True)
class KaplanLaw:
    """Kaplan et al. 2020, "Scaling Laws for Neural Language Models". N: non-embedding parameters;
    losses in nats/token on WebText2; compute in FLOPs here, PF-days in the paper."""
    # Table 5 (section 1.2, eqs. 1.1-1.3): single-variable power laws.
    alpha_N: float = 0.076
    N_c: float = 8.8e13
    alpha_D: float = 0.095
    D_c: float = 5.4e13
    alpha_C_min: float = 0.050
    C_c_min_pf_days: float = 3.1e8
    # Table 2 (section 4, eq. 1.5 / 4.1): the joint L(N, D) fit.
    joint_alpha_N: float = 0.076
    joint_alpha_D: float = 0.103
    joint_N_c: float = 6.4e13
    joint_D_c: float = 1.8e13
    # Table 6 (section 6.1, eq. 1.7 and Figure 14): compute-efficient allocation, C in PF-days.
    N_e: float = 1.3e9
    p_N: float = 0.73
    D_e: float = 2e10
    p_D: float = 0.27
    name: str = "kaplan"

    def loss_N(self, N):
        return (self.N_c / np.asarray(N, dtype=float)) ** self.alpha_N

    def loss_D(self, D):
        return (self.D_c / np.asarray(D, dtype=float)) ** self.alpha_D

    def loss_C(self, C):
        """Loss on the compute-efficient frontier, eq. 1.3 (C_min in FLOPs)."""
        return (self.C_c_min_pf_days / (np.asarray(C, dtype=float) / PF_DAY)) ** self.alpha_C_min

    def loss(self, N, D):
        """Eq. 1.5: L = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        a_n, a_d = self.joint_alpha_N, self.joint_alpha_D
        return ((self.joint_N_c / N) ** (a_n / a_d) + self.joint_D_c / D) ** a_d

    def optimal(self, C):
        """(N_opt, D_opt, loss) from Table 6 and eq. 1.3. As published, 6*N_opt*D_opt is not C:
        the paper's frontier also moves batch size and steps (section 5.1)."""
        C = np.asarray(C, dtype=float)
        if np.any(~np.isfinite(C)) or np.any(C <= 0):
            raise ValueError(f"C must be positive and finite, got {C!r}")
        pf_days = C / PF_DAY
        return self.N_e * pf_days ** self.p_N, self.D_e * pf_days ** self.p_D, self.loss_C(C)


KAPLAN = KaplanLaw()
LAWS = {"chinchilla": CHINCHILLA, "epoch2024": EPOCH_2024, "kaplan": KAPLAN}


def law_by_name(name: str):
    return validate.lookup("law", name, LAWS)
