"""Scaling laws: published constants, the closed-form optimum, and the Kaplan frontier."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagedlm.scaling import CHINCHILLA, EPOCH_2024, KAPLAN, ChinchillaLaw, law_by_name
from pagedlm.scaling.laws import PF_DAY

laws = st.builds(ChinchillaLaw, E=st.floats(0.5, 3), A=st.floats(10, 5000), B=st.floats(10, 5000),
                 alpha=st.floats(0.1, 0.8), beta=st.floats(0.1, 0.8))


@settings(deadline=None)
@given(st.one_of(st.sampled_from([CHINCHILLA, EPOCH_2024]), laws), st.floats(15, 28))
def test_closed_form_optimum_equals_numeric_minimiser(law, log10_c):
    C = 10.0**log10_c
    n_closed, d_closed, l_closed = law.optimal(C)
    n_num, d_num, l_num = law.optimal_numeric(C)
    assert n_num == pytest.approx(n_closed, rel=1e-6)
    assert d_num == pytest.approx(d_closed, rel=1e-6)
    assert l_num == pytest.approx(l_closed, rel=1e-12)
    assert 6 * n_closed * d_closed == pytest.approx(C, rel=1e-12)


@given(st.floats(15, 28), st.floats(-1, 1))
def test_the_optimum_beats_its_neighbours_on_the_isoflop_curve(log10_c, shift):
    C = 10.0**log10_c
    n, _, loss = CHINCHILLA.optimal(C)
    other = n * 10.0**shift
    assert CHINCHILLA.loss(other, C / (6 * other)) >= loss - 1e-12


def test_chinchilla_approach_3_constants_and_exponents():
    # Hoffmann et al. 2022, section 3.3: E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, so that
    # N_opt ~ C^a with a = beta/(alpha+beta) = 0.45 (Table 2 prints 0.46 from the unrounded fit).
    assert (CHINCHILLA.E, CHINCHILLA.A, CHINCHILLA.B, CHINCHILLA.alpha, CHINCHILLA.beta) == (1.69, 406.4, 410.7,
                                                                                              0.34, 0.28)
    n1, _, _ = CHINCHILLA.optimal(1e20)
    n2, _, _ = CHINCHILLA.optimal(1e22)
    assert math.log10(n2 / n1) / 2 == pytest.approx(0.28 / 0.62)


def test_epoch_2024_refit_agrees_with_chinchilla_approach_1():
    # Besiroglu et al. 2024 report a = beta/(alpha+beta) = 0.5126 for their refit and that, unlike the
    # paper's Approach 3, it agrees with Hoffmann et al.'s Approaches 1 and 2. Hoffmann et al. 2022,
    # Table 3 (Approach 1): 1.23e22 FLOPs -> 10B parameters, 205.1B tokens.
    assert EPOCH_2024.beta / (EPOCH_2024.alpha + EPOCH_2024.beta) == pytest.approx(0.5126, abs=1e-4)
    n, d, _ = EPOCH_2024.optimal(1.23e22)
    assert n == pytest.approx(10e9, rel=0.03)
    assert d == pytest.approx(205.1e9, rel=0.03)


def test_kaplan_frontier_meets_the_papers_intersection_point():
    # Kaplan et al. 2020, section 6.3: the compute-efficient frontier reaches C* ~ 1e4 PF-days,
    # N* ~ 1e12 parameters, L* ~ 1.7 nats/token.
    n, _, loss = KAPLAN.optimal(1e4 * PF_DAY)
    assert n == pytest.approx(1e12, rel=0.15)
    assert loss == pytest.approx(1.7, abs=0.05)
    n_one, d_one, _ = KAPLAN.optimal(PF_DAY)  # Table 6 constants, C in PF-days
    assert (n_one, d_one) == pytest.approx((1.3e9, 2e10))


def test_kaplan_joint_law_reduces_to_a_power_law_in_N_with_unlimited_data():
    # Eq. 1.5 with D -> infinity is (N_c/N)^alpha_N, here with Table 2's joint constants.
    N = np.array([1e8, 1e9, 1e10])
    assert KAPLAN.loss(N, np.inf) == pytest.approx((6.4e13 / N) ** 0.076)


def test_loss_broadcasts_over_arrays():
    N, D = np.meshgrid(np.logspace(8, 10, 3), np.logspace(10, 12, 4))
    assert CHINCHILLA.loss(N, D).shape == (4, 3)


def test_bad_law_input_is_named():
    with pytest.raises(ValueError, match="alpha"):
        ChinchillaLaw(E=1.7, A=400, B=400, alpha=-0.3, beta=0.3)
    with pytest.raises(ValueError, match="C"):
        CHINCHILLA.optimal(-1e20)
    with pytest.raises(ValueError, match="C"):
        CHINCHILLA.optimal_numeric(0.0)
    with pytest.raises(ValueError, match="law"):
        law_by_name("hoffmann")
