"""The synthetic generator: builders, validation, sampling, mixtures and statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats

from conftest import CLOSED_FORM, EXACT_CONSTRUCTION, assert_close, mc_tolerance
from strategies import bounded, naive_second_moment, naive_signed_mean, problems, vectors
from synthetic import (
    FAMILIES,
    Behavior,
    ParameterError,
    Problem,
    allocate,
    behavior_statistics,
    behaviors_with_angles,
    empirical_mixture,
    fit_gaussian,
    isotropic,
    population_mixture,
    problem_statistics,
    sample,
    sample_batch,
    with_distinguishability,
)

EYE2 = np.eye(2)
CORRELATED = np.array([[2.0, 0.6, -0.3], [0.6, 1.0, 0.2], [-0.3, 0.2, 0.5]])
MU = np.array([1.0, -2.0, 0.5])


def one_behavior_problem(family: str, **changes) -> Problem:
    b = Behavior("b", MU, -MU, CORRELATED, 0.5 * CORRELATED)
    return Problem((b,), family=family, **changes)


# --------------------------------------------------------------------------- builders


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6).flatmap(lambda d: st.tuples(
    st.just(d), bounded(0.0, 10.0), bounded(0.01, 3.0), vectors(d, -3, 3), vectors(d, -3, 3))))
def test_isotropic_has_exact_moments(args):
    dim, delta, sigma, direction, center = args
    if np.linalg.norm(direction) < 1e-3:
        direction = np.ones(dim)
    b = isotropic("x", dim, delta, sigma=sigma, direction=direction, center=center)
    assert_close(np.linalg.norm(b.mu_pos - b.mu_neg), delta, EXACT_CONSTRUCTION)
    assert_close(b.distinguishability, delta, EXACT_CONSTRUCTION)
    assert_close((b.mu_pos + b.mu_neg) / 2, center, EXACT_CONSTRUCTION)
    # d is parallel to the requested direction
    unit = direction / np.linalg.norm(direction)
    assert_close(b.direction, delta * unit, EXACT_CONSTRUCTION, scale=1 + delta)
    assert np.array_equal(b.cov_pos, sigma**2 * np.eye(dim))
    assert_close(b.concentration, sigma**2, CLOSED_FORM)
    assert_close(b.trace, dim * sigma**2, CLOSED_FORM)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5).flatmap(lambda d: st.tuples(vectors(d), vectors(d))),
       bounded(0.0, 10.0))
def test_with_distinguishability_rescales_only_the_gap(means, delta):
    mu_pos, mu_neg = means
    cov = np.diag(np.arange(1.0, len(mu_pos) + 1))
    if np.array_equal(mu_pos, mu_neg):  # no direction to rescale
        with pytest.raises(ParameterError, match="distinguishability"):
            with_distinguishability(Behavior("x", mu_pos, mu_neg, cov, cov), delta)
        return
    assume(np.linalg.norm(mu_pos - mu_neg) > 1e-3)
    b = with_distinguishability(Behavior("x", mu_pos, mu_neg, cov, 2 * cov), delta)
    assert_close(b.distinguishability, delta, EXACT_CONSTRUCTION)
    assert_close(b.mu_pos + b.mu_neg, mu_pos + mu_neg, EXACT_CONSTRUCTION)
    unit = (mu_pos - mu_neg) / np.linalg.norm(mu_pos - mu_neg)
    assert_close(b.direction, delta * unit, EXACT_CONSTRUCTION, scale=1 + delta)
    assert np.array_equal(b.cov_pos, cov) and np.array_equal(b.cov_neg, 2 * cov)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4).flatmap(lambda k: st.tuples(
    st.integers(k, 6), st.lists(bounded(0.0, 5.0), min_size=k, max_size=k),
    st.lists(vectors(k, -1, 1), min_size=k, max_size=k))))
def test_behaviors_with_angles_realise_the_gram_matrix(args):
    dim, deltas, raw = args
    # a valid cosine matrix: the normalised Gram matrix of random vectors
    vecs = np.array(raw) + 1e-3 * np.eye(len(deltas))
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cosines = np.clip(vecs @ vecs.T, -1, 1)
    np.fill_diagonal(cosines, 1.0)
    made = behaviors_with_angles(dim, deltas, cosines, sigma=0.7)
    d = np.stack([b.direction for b in made])
    expected = np.outer(deltas, deltas) * cosines
    assert_close(d @ d.T, expected, EXACT_CONSTRUCTION, scale=1 + max(deltas) ** 2)
    for b in made:
        assert_close(b.mu_pos + b.mu_neg, np.zeros(dim), EXACT_CONSTRUCTION)
        assert np.array_equal(b.cov_pos, 0.7**2 * np.eye(dim))


def test_behaviors_with_one_cosine():
    made = behaviors_with_angles(4, [1.0, 2.0, 3.0], 0.25)
    d = np.stack([b.direction for b in made])
    expected = np.array([[1, 0.5, 0.75], [0.5, 4, 1.5], [0.75, 1.5, 9]])
    assert_close(d @ d.T, expected, EXACT_CONSTRUCTION, scale=10.0)


# --------------------------------------------------------------------------- validation

NAN_MU = np.array([0.0, np.nan])
VALIDATION_CASES = {
    "non-symmetric": (lambda: Behavior("b", [0, 0], [1, 0], [[1, 0.5], [0, 1]], EYE2),
                      "cov_pos", "must be symmetric"),
    "non-psd": (lambda: Behavior("b", [0, 0], [1, 0], EYE2, [[1, 2], [2, 1]]),
                "cov_neg", "must be positive semi-definite"),
    "wrong-shape": (lambda: Behavior("b", [0, 0], [1, 0], np.eye(3), EYE2),
                    "cov_pos", "must have shape (2, 2)"),
    "nan-mean": (lambda: Behavior("b", NAN_MU, [1, 0], EYE2, EYE2),
                 "mu_pos", "must have finite entries"),
    "nan-cov": (lambda: Behavior("b", [0, 0], [1, 0], [[1, 0], [0, np.nan]], EYE2),
                "cov_pos", "must have finite entries"),
    "zero-weight": (lambda: Behavior("b", [0, 0], [1, 0], EYE2, EYE2, weight=0.0),
                    "weight", "must be > 0"),
    "negative-weight": (lambda: Behavior("b", [0, 0], [1, 0], EYE2, EYE2, weight=-1),
                        "weight", "must be > 0"),
    "pos-fraction-0": (lambda: Behavior("b", [0, 0], [1, 0], EYE2, EYE2, pos_fraction=0.0),
                       "pos_fraction", "must be > 0"),
    "pos-fraction-1": (lambda: Behavior("b", [0, 0], [1, 0], EYE2, EYE2, pos_fraction=1.0),
                       "pos_fraction", "must be < 1"),
    "label-noise": (lambda: one_behavior_problem("gaussian", label_noise=0.5),
                    "label_noise", "must be < 0.5"),
    "negative-noise": (lambda: one_behavior_problem("gaussian", label_noise=-0.1),
                       "label_noise", "must be >= 0"),
    "mismatched-dims": (lambda: Problem((isotropic("a", 2, 1.0), isotropic("b", 3, 1.0))),
                        "behaviors.1.mu_pos", "must have dimension 2"),
    "duplicate-names": (lambda: Problem((isotropic("a", 2, 1.0), isotropic("a", 2, 2.0))),
                        "behaviors.name", "must be unique"),
    "unknown-family": (lambda: one_behavior_problem("gausian"),
                       "family", "did you mean 'gaussian'"),
    "reserved-name": (lambda: isotropic("all", 2, 1.0), "name", "other than 'all'"),
}


@pytest.mark.parametrize("case", sorted(VALIDATION_CASES))
def test_invalid_parameters_raise_one_line_errors(case):
    build, name, rule = VALIDATION_CASES[case]
    with pytest.raises(ParameterError) as info:
        build()
    message = str(info.value)
    assert info.value.name == name
    assert message.startswith(f"{name} = ")
    assert rule in message
    assert "\n" not in message


# --------------------------------------------------------------------------- sampling


def test_same_seed_same_tensors_and_different_seeds_differ():
    problem = one_behavior_problem("laplace", label_noise=0.2)
    a, b = sample(problem, 300, 7), sample(problem, 300, 7)
    c = sample(problem, 300, 8)
    for field in ("features", "signs", "true_signs", "behavior"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.features, c.features)
    assert not torch.equal(a.signs, c.signs)
    # a batch is the stack of the single-seed samples
    batch = sample_batch(problem, 300, [7, 8])
    assert torch.equal(batch.seed(0).features, a.features)
    assert torch.equal(batch.seed(1).signs, c.signs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_float32_is_float64_rounded(family):
    problem = one_behavior_problem(family, label_noise=0.1)
    s32 = sample(problem, 500, 3, dtype=torch.float32)
    s64 = sample(problem, 500, 3, dtype=torch.float64)
    assert s32.features.dtype == torch.float32 and s64.features.dtype == torch.float64
    assert torch.equal(s32.features, s64.features.to(torch.float32))
    assert torch.equal(s32.signs, s64.signs.to(torch.float32))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_reproduces_mean_and_covariance(family):
    n = 200_000
    problem = Problem((Behavior("b", MU, -MU, CORRELATED, CORRELATED, pos_fraction=0.5),),
                      family=family)
    data = sample(problem, n, 11, dtype=torch.float64)
    x = data.features[data.true_signs > 0].numpy()  # the positive class
    m = len(x)
    assert_close(x.mean(0), MU, 1.0, scale=mc_tolerance(np.sqrt(np.diag(CORRELATED)), m))
    centred = x - MU
    products = centred[:, :, None] * centred[:, None, :]  # (m, d, d)
    sd = products.std(0)
    assert_close(products.mean(0), CORRELATED, 1.0, scale=mc_tolerance(sd, m))


KURTOSIS = {"gaussian": 0.0, "laplace": 3.0, "uniform": -1.2}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_standard_draws_have_the_family_moments(family):
    n, dim = 200_000, 3
    z = FAMILIES[family].sample_standard(n, dim, np.random.default_rng(5))
    assert z.shape == (n, dim) and z.dtype == np.float64
    _check_standard_moments(z, family)
    if family == "uniform":
        assert np.all(np.abs(z) <= math.sqrt(3))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_standard_from_unit_maps_uniform_points_to_the_family(family):
    n, dim = 200_000, 3
    unit = np.random.default_rng(6).random((n, dim + 1))
    z = FAMILIES[family].standard_from_unit(unit)
    assert z.shape == (n, dim)
    _check_standard_moments(z, family)
    # and the distribution, not only moments: KS test of a coordinate (p > 1e-6)
    cdf = {"gaussian": stats.norm.cdf,
           "laplace": stats.laplace(scale=1 / math.sqrt(2)).cdf,
           "uniform": stats.uniform(-math.sqrt(3), 2 * math.sqrt(3)).cdf}[family]
    assert stats.kstest(z[:, 0], cdf).pvalue > 1e-6


def _check_standard_moments(z: np.ndarray, family: str):
    """Mean 0, covariance I, and the excess kurtosis of one projection."""
    n, dim = z.shape
    assert_close(z.mean(0), np.zeros(dim), 1.0, scale=mc_tolerance(1.0, n))
    products = z[:, :, None] * z[:, None, :]
    assert_close(products.mean(0), np.eye(dim), 1.0, scale=mc_tolerance(products.std(0), n))
    projection = z @ (np.ones(dim) / math.sqrt(dim))
    fourth = projection**4
    # a projection of √E·N is again √E·N (kurtosis 6); a projection of the uniform
    # cube is not uniform: excess kurtosis −1.2/dim by cumulant additivity
    expected = KURTOSIS[family] / (dim if family == "uniform" else 1)
    assert_close(fourth.mean() - 3.0, expected, 1.0, scale=mc_tolerance(fourth.std(), n))


# Moments of the standardised projection Y = √w·Z (w ≡ 1, or w ~ Exp(1)) and of the
# Stein weight w: E[Y^2k] = E[w^k]·(2k−1)!!, E[w Y^2k] = E[w^(k+1)]·(2k−1)!!,
# E[w^k] = 1 resp. k!; and E[w|Y|] = E[w^(3/2)]·√(2/π) = Γ(5/2)√(2/π) for Laplace.
PROJECTION_MOMENTS = {
    "gaussian": {"Y2": 1.0, "Y4": 3.0, "Y6": 15.0, "w": 1.0, "wY2": 1.0,
                 "w|Y|": math.sqrt(2 / math.pi)},
    "laplace": {"Y2": 1.0, "Y4": 6.0, "Y6": 90.0, "w": 1.0, "wY2": 2.0,
                "w|Y|": math.gamma(2.5) * math.sqrt(2 / math.pi)},
}


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
@pytest.mark.parametrize("panel_width", [0.1, 0.5])
def test_projection_rule_integrates_the_projection_moments(family, panel_width):
    y, p, q = FAMILIES[family].projection_rule(panel_width)
    expected = PROJECTION_MOMENTS[family]
    got = {"Y2": p @ y**2, "Y4": p @ y**4, "Y6": p @ y**6, "w": p @ q, "wY2": p @ (q * y**2),
           "w|Y|": p @ (q * np.abs(y))}
    assert_close(p.sum(), 1.0, CLOSED_FORM)
    assert_close(p @ y, 0.0, CLOSED_FORM)
    for key, value in expected.items():
        assert_close(got[key], value, CLOSED_FORM, scale=value, err_msg=key)
    assert FAMILIES["uniform"].projection_rule() is None


def test_laplace_stein_weight_is_the_conditional_mean_of_w():
    """``q(y) = E[w | Y = y]``: binned Monte Carlo of w against the rule's q."""
    n = 400_000
    rng = np.random.default_rng(8)
    w = rng.standard_exponential(n)
    y = np.sqrt(w) * rng.standard_normal(n)
    nodes, _, q = FAMILIES["laplace"].projection_rule()
    for lo, hi in [(-3.0, -2.5), (-0.2, 0.0), (0.5, 0.6), (1.5, 2.0)]:
        in_bin = (y > lo) & (y < hi)
        rule = (nodes > lo) & (nodes < hi)
        # q is linear in |y| and the rule's nodes are dense: average q over the bin by the
        # Laplace density (the conditional law of Y within the bin)
        dens = np.exp(-np.sqrt(2) * np.abs(nodes[rule]))
        expected = (q[rule] * dens).sum() / dens.sum()
        assert abs(w[in_bin].mean() - expected) <= mc_tolerance(w[in_bin].std(), in_bin.sum())


@pytest.mark.parametrize("family, reference", [
    ("gaussian", stats.norm()),
    ("laplace", stats.laplace(scale=1 / math.sqrt(2))),
])
def test_projection_cdf_is_the_standardised_law(family, reference):
    x = np.linspace(-8, 8, 161)
    assert_close(FAMILIES[family].projection_cdf(x), reference.cdf(x), CLOSED_FORM)
    # and it is the law the sampler draws: one coordinate of sample_standard
    z = FAMILIES[family].sample_standard(100_000, 1, np.random.default_rng(9))[:, 0]
    assert stats.kstest(z, FAMILIES[family].projection_cdf).pvalue > 1e-6
    with pytest.raises(ValueError):
        FAMILIES["uniform"].projection_cdf(x)


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_label_noise_flips_a_fraction_epsilon(eps):
    n = 100_000
    data = sample(one_behavior_problem("gaussian", label_noise=eps), n, 2)
    flipped = (data.signs != data.true_signs).double().mean().item()
    assert abs(flipped - eps) <= mc_tolerance(math.sqrt(eps * (1 - eps)), n)
    # flips leave the embeddings with their true class
    clean = sample(one_behavior_problem("gaussian"), n, 2)
    assert torch.equal(clean.signs, clean.true_signs)


# --------------------------------------------------------------------------- allocation


def naive_largest_remainder(total: int, shares) -> np.ndarray:
    exact = [total * s / sum(shares) for s in shares]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return np.array(counts)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.lists(bounded(0.01, 10.0), min_size=1, max_size=8))
def test_allocate_sums_exactly_and_is_proportional(total, shares):
    counts = allocate(total, np.array(shares))
    assert counts.sum() == total
    exact = total * np.array(shares) / np.sum(shares)
    assert np.all(np.abs(counts - exact) < 1)
    assert np.array_equal(counts, naive_largest_remainder(total, shares))


@settings(max_examples=30, deadline=None)
@given(problems(max_dim=2), st.integers(2, 400))
def test_sample_layout_follows_allocation(problem, n):
    per_behavior = allocate(n, problem.weights)
    assume(per_behavior.min() >= 1)  # else sampling refuses n (tested below)
    data = sample(problem, n, 0, dtype=torch.float64)
    b = data.behavior.numpy()
    for i, behavior in enumerate(problem.behaviors):
        assert (b == i).sum() == per_behavior[i]
        n_pos, _ = allocate(int(per_behavior[i]), [behavior.pos_fraction,
                                                   1 - behavior.pos_fraction])
        assert (data.true_signs.numpy()[b == i] > 0).sum() == n_pos
    assert np.all(np.diff(b) >= 0)  # ordered by behavior


def test_n_too_small_for_every_behavior_is_refused():
    problem = Problem((isotropic("a", 2, 1.0), isotropic("b", 2, 1.0, weight=0.1),
                       isotropic("c", 2, 1.0, weight=0.1)))
    with pytest.raises(ParameterError) as err:
        sample(problem, 4, 0)
    assert err.value.name == "n" and "behavior 'c' gets none" in str(err.value)
    assert sample(problem, 12, 0).behavior.bincount().min() >= 1


# --------------------------------------------------------------------------- mixtures


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(20, 300), st.integers(0, 2**31))
def test_empirical_mixture_reproduces_the_sample(problem, n, seed):
    data = sample(problem, n, seed, dtype=torch.float64)
    mix = empirical_mixture(data.features, data.signs, data.behavior, data.names)
    x, s, b = data.features.numpy(), data.signs.numpy(), data.behavior.numpy()
    assert_close(mix.weights.sum(), 1.0, CLOSED_FORM)
    # the sample mean of s·g and of g gᵀ, computed naively
    assert_close(mix.signed_mean(), (s[:, None] * x).mean(0), CLOSED_FORM)
    assert_close(mix.second_moment(), x.T @ x / n, CLOSED_FORM)
    for c in range(len(mix.weights)):
        group = x[(b == mix.behavior[c]) & (s == mix.signs[c])]
        assert_close(mix.weights[c], len(group) / n, CLOSED_FORM)
        assert_close(mix.means[c], group.mean(0), CLOSED_FORM)
        biased = np.cov(group, rowvar=False, ddof=0).reshape(problem.dim, problem.dim)
        assert_close(mix.covs[c], biased, CLOSED_FORM)
    for i in range(len(problem.behaviors)):
        rows = b == i
        assert_close(mix.signed_mean(i), (s[rows, None] * x[rows]).mean(0), CLOSED_FORM)
        assert_close(mix.second_moment(i), x[rows].T @ x[rows] / rows.sum(), CLOSED_FORM)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_population_mixture_moments(problem):
    mix = population_mixture(problem)
    assert_close(mix.weights.sum(), 1.0, CLOSED_FORM)
    assert mix.family == problem.family
    assert_close(mix.behavior_weights(), problem.weights, CLOSED_FORM)
    assert_close(mix.signed_mean(), naive_signed_mean(problem), CLOSED_FORM)
    assert_close(mix.second_moment(), naive_second_moment(problem), CLOSED_FORM)
    for i in range(len(problem.behaviors)):
        assert_close(mix.signed_mean(i), naive_signed_mean(problem, i), CLOSED_FORM)
        assert_close(mix.second_moment(i), naive_second_moment(problem, i), CLOSED_FORM)


# --------------------------------------------------------------------------- statistics


@settings(max_examples=30, deadline=None)
@given(problems(), st.integers(0, 2**31))
def test_statistics_match_numpy(problem, seed):
    data = sample(problem, 400, seed, dtype=torch.float64)
    x, s, b = data.features.numpy(), data.signs.numpy(), data.behavior.numpy()
    table = behavior_statistics(data.features, data.signs, data.behavior, data.names)
    fitted = fit_gaussian(data.features, data.signs, data.behavior, data.names)
    assert list(table["behavior"]) == problem.names
    for i, row in table.iterrows():
        pos, neg = x[(b == i) & (s > 0)], x[(b == i) & (s < 0)]
        cov_p, cov_n = (_unbiased(pos), _unbiased(neg))
        assert row["n_pos"] == len(pos) and row["n_neg"] == len(neg)
        assert_close(row["distinguishability"], np.linalg.norm(pos.mean(0) - neg.mean(0)),
                     CLOSED_FORM)
        assert_close(row["concentration"], max(np.linalg.eigvalsh(cov_p)[-1],
                                               np.linalg.eigvalsh(cov_n)[-1]), CLOSED_FORM)
        assert_close(row["trace"], max(np.trace(cov_p), np.trace(cov_n)), CLOSED_FORM)
        assert_close(row["mean_norm"], np.linalg.norm((pos.mean(0) + neg.mean(0)) / 2),
                     CLOSED_FORM)
        fb = fitted.behaviors[i]
        assert_close(fb.cov_pos, cov_p, CLOSED_FORM)
        assert_close(fb.mu_neg, neg.mean(0), CLOSED_FORM)
        assert_close(fb.pos_fraction, len(pos) / (len(pos) + len(neg)), CLOSED_FORM)
        assert_close(fitted.weights[i], (b == i).mean(), CLOSED_FORM)


def _unbiased(group: np.ndarray) -> np.ndarray:
    centred = group - group.mean(0)
    return centred.T @ centred / (len(group) - 1)


@settings(max_examples=30, deadline=None)
@given(problems())
def test_problem_statistics_from_parameters(problem):
    table = problem_statistics(problem)
    for row, b in zip(table.itertuples(), problem.behaviors):
        assert_close(row.distinguishability, np.linalg.norm(b.mu_pos - b.mu_neg), CLOSED_FORM)
        assert_close(row.concentration, max(np.linalg.eigvalsh(b.cov_pos)[-1],
                                            np.linalg.eigvalsh(b.cov_neg)[-1]), CLOSED_FORM)
        assert_close(row.trace, max(np.trace(b.cov_pos), np.trace(b.cov_neg)), CLOSED_FORM)
        assert np.isnan(row.n_pos)


def test_fit_gaussian_needs_two_statements_per_class():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="needs >= 2 positive"):
        fit_gaussian(x, np.array([1.0, -1.0, -1.0]), np.zeros(3, dtype=int), ["b"])


def test_fit_gaussian_recovers_the_population_in_the_limit():
    n = 100_000
    problem = one_behavior_problem("gaussian")
    data = sample(problem, n, 4, dtype=torch.float64)
    fitted = fit_gaussian(data.features, data.signs, data.behavior, data.names).behaviors[0]
    # each class has n/2 draws; entries of Σ̂ have sd ≤ √(Σ_ii Σ_jj + Σ_ij²) ≤ 2 max Σ_ii
    assert_close(fitted.mu_pos, MU, 1.0, scale=mc_tolerance(np.sqrt(np.diag(CORRELATED)), n // 2))
    assert_close(fitted.cov_pos, CORRELATED, 1.0, scale=mc_tolerance(2 * 2.0, n // 2))


def test_diagonal_covs_detects_exactly_diagonal_covariances():
    """``Mixture.diagonal_covs``: the diagonals when every ``Σ_c`` is diagonal (zeros on the
    diagonal allowed), ``None`` as soon as one entry off the diagonal is nonzero."""
    diagonal = Problem((isotropic("a", 3, 2.0, sigma=0.7),
                        Behavior("b", [1, 0, 0], [0, 1, 0], np.diag([0.5, 0.0, 2.0]),
                                 np.diag([1.0, 1.0, 1.0])),))
    got = population_mixture(diagonal).diagonal_covs
    want = np.stack([np.diag(c) for c in population_mixture(diagonal).covs])
    assert got is not None and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    tilted = np.diag([0.0, 1.0, 1.0])
    tilted[0, 1] = tilted[1, 0] = 1e-300  # off the diagonal, however small
    correlated = Problem((isotropic("a", 3, 2.0),
                          Behavior("b", [1, 0, 0], [0, 1, 0], tilted, np.eye(3)),))
    assert population_mixture(correlated).diagonal_covs is None
