"""Group statistics and inter-subject ceilings on simulated data with known truth."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from pipelines.errors import ConfigError
from pipelines.group.isc import intersubject_ceiling
from pipelines.group.stats import fisher_z_mean, sign_flip_test


def test_fisher_z_mean_is_tanh_of_the_mean_z():
    r = np.array([[0.1, 0.9], [0.3, 0.5], [0.5, -0.2]])
    assert np.allclose(fisher_z_mean(r), np.tanh(np.arctanh(r).mean(0)))


def test_sign_flip_holds_its_level_on_null_targets(rng):
    # 12 subjects (4,096 sign patterns: exact), 4,000 null targets whose r are noise around 0
    r = np.tanh(rng.standard_normal((12, 4000)) * 0.1)
    test = sign_flip_test(r, n_permutations=5000)
    assert test.exact and test.n_permutations == 4096
    level = float(np.mean(test.p < 0.05))
    assert 0.04 <= level <= 0.06, level
    assert test.significant.sum() <= 4  # FDR: (almost) nothing declared on pure noise
    assert float(np.mean(test.p_max < 0.05)) == 0.0  # family-wise: none at all here


def test_sign_flip_random_patterns_hold_their_level_too(rng):
    r = np.tanh(rng.standard_normal((25, 2000)) * 0.1)  # 2**25 patterns: 2,000 random ones
    test = sign_flip_test(r, n_permutations=2000, random_state=1)
    assert not test.exact and test.n_permutations == 2000
    assert 0.035 <= float(np.mean(test.p < 0.05)) <= 0.065


def test_sign_flip_finds_a_planted_group_effect(rng):
    r = np.tanh(rng.standard_normal((10, 500)) * 0.1)
    r[:, :50] += 0.2  # the first 50 targets carry a group effect
    test = sign_flip_test(r, n_permutations=10_000)
    assert test.significant[:50].mean() >= 0.9
    assert test.significant[50:].mean() <= 0.02
    maxstat = sign_flip_test(r, n_permutations=10_000, correction="maxstat")
    assert maxstat.significant[:50].mean() >= 0.5 and not maxstat.significant[50:].any()
    assert np.allclose(test.mean_r, fisher_z_mean(r))


def test_sign_flip_p_values_equal_scipys_exact_test(rng):
    r = np.tanh(rng.standard_normal((8, 5)) * 0.2 + 0.05)
    ours = sign_flip_test(r, n_permutations=1000)
    z = np.arctanh(r)
    for v in range(5):
        ref = sps.permutation_test((z[:, v],), lambda x: sps.ttest_1samp(x, 0).statistic,
                                   permutation_type="samples", alternative="greater", n_resamples=np.inf)
        assert ours.p[v] == pytest.approx(ref.pvalue, abs=1e-12)


def test_sign_flip_refuses_bad_input():
    with pytest.raises(ConfigError, match="at least 2 subjects"):
        sign_flip_test(np.zeros((1, 3)))
    with pytest.raises(ConfigError, match="'group.correction'"):
        sign_flip_test(np.zeros((3, 3)), correction="bonferroni")


def _planted(rng, rho: np.ndarray, n_subjects: int = 8, n_samples: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Subjects = shared AR(1) signal * rho + noise * sqrt(1 - rho**2): their true ceiling is rho."""
    n_targets = rho.size
    shared = np.zeros((n_samples, n_targets))
    e = rng.standard_normal((n_samples, n_targets))
    for t in range(1, n_samples):
        shared[t] = 0.7 * shared[t - 1] + e[t]
    shared = (shared - shared.mean(0)) / shared.std(0)
    noise = rng.standard_normal((n_subjects, n_samples, n_targets))
    return rho * shared + np.sqrt(1 - rho ** 2) * noise, shared


def test_intersubject_ceiling_recovers_the_planted_one(rng):
    rho = np.repeat([0.0, 0.3, 0.5, 0.8], 40)
    Y, shared = _planted(rng, rho)
    ceiling = intersubject_ceiling(Y)
    truth = np.array([[np.corrcoef(Y[i][:, v], shared[:, v])[0, 1] for v in range(rho.size)]
                      for i in range(Y.shape[0])])
    for level in (0.3, 0.5, 0.8):
        cols = rho == level
        est = np.nanmean(ceiling.r_max[:, cols])
        assert est == pytest.approx(level, abs=0.05), (level, est)
        assert np.nanmean(np.abs(ceiling.r_max[:, cols] - truth[:, cols])) < 0.08
        assert np.nanmean(ceiling.r_loso[:, cols]) < level  # the raw LOSO correlation underestimates it
    none = rho == 0.0
    assert np.mean(np.isfinite(ceiling.r_max[:, none])) <= 0.08  # no shared signal: (almost) no ceiling
    assert np.isfinite(ceiling.r_max[:, rho >= 0.5]).all()


def test_intersubject_ceiling_needs_three_subjects(rng):
    with pytest.raises(ConfigError, match="n_subjects >= 3"):
        intersubject_ceiling(rng.standard_normal((2, 100, 3)))


def test_group_config_keys_are_checked_and_leave_other_analyses_ids_alone():
    import yaml

    from pipelines.config import parse_config

    from .conftest import REPO

    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    plain = parse_config(raw)
    assert "group" not in plain.to_dict()  # no group level: the analysis id is what it was
    with_group = parse_config({**raw, "group": {"atlas": "derivatives/atlas_dseg.nii.gz"}})
    assert with_group.config_hash != plain.config_hash and with_group.group.permutations == 10_000
    with pytest.raises(ConfigError) as err:
        parse_config({**raw, "group": {"atlass": "x.nii.gz"}}, "demo.yaml")
    assert "atlass" in str(err.value) and "Did you mean 'atlas'" in str(err.value)
    with pytest.raises(ConfigError, match="group"):
        parse_config({**raw, "group": {"transform": "../xfm/{subject}.txt"}})
    with pytest.raises(ConfigError, match="correction"):
        parse_config({**raw, "group": {"correction": "bonferroni"}})
