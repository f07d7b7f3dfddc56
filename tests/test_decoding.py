"""Decoding feature spaces from responses: per-feature r, identification, ROC-AUC."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipelines.decoding import decoding_design, fit_decoding, identification, roc_auc
from pipelines.errors import ConfigError, FitError
from pipelines.fit import zscore_by_group

ALPHAS = np.logspace(-1, 4, 6)


def make_brain(rng: np.random.Generator, n_features: int = 8, n_voxels: int = 300, gain: float = 0.5):
    groups = np.repeat(np.arange(4), 150)
    F = zscore_by_group(rng.standard_normal((600, n_features)), groups)
    Y = F @ rng.standard_normal((n_features, n_voxels)) * gain + rng.standard_normal((600, n_voxels))
    return zscore_by_group(Y, groups), F, groups


def test_decoder_identifies_held_out_segments(rng):
    Y, F, groups = make_brain(rng, gain=0.15)
    res = fit_decoding(Y, F, groups, ALPHAS, segment_length=5)
    ident = res.identification
    assert res.valid.all() and (res.r > 0.5).all()
    assert ident.n_segments == 120 and ident.chance_top1 == pytest.approx(1 / 120)
    assert ident.top1 > 20 * ident.chance_top1 and ident.top5 >= ident.top1 and ident.auc > 0.95
    assert set(ident.as_dict()) == {"top1", "top5", "chance_top1", "chance_top5", "auc", "n_segments",
                                    "segment_length"}


def test_decoding_noise_is_at_chance(rng):
    groups = np.repeat(np.arange(4), 150)
    Y = zscore_by_group(rng.standard_normal((600, 200)), groups)
    F = zscore_by_group(rng.standard_normal((600, 6)), groups)
    ident = fit_decoding(Y, F, groups, ALPHAS).identification
    assert abs(ident.auc - 0.5) < 0.05 and ident.top1 < 5 * ident.chance_top1


def test_more_responses_than_samples_use_the_kernel_solver(rng):
    Y, F, groups = make_brain(rng, n_voxels=900, gain=0.1)
    res = fit_decoding(Y, F, groups, ALPHAS, test_groups=[3])
    assert np.isnan(res.predictions[groups != 3]).all()
    assert res.identification.n_segments == 150 and res.identification.auc > 0.9


def test_identification_ranks_by_brute_force(rng):
    T = rng.standard_normal((12, 3))
    P = T + rng.standard_normal((12, 3))
    fold = np.repeat([0, 1], 6)
    ident = identification(T, P, fold, segment_length=2)
    Tz, Pz = (T - T.mean(0)) / T.std(0), (P - P.mean(0)) / P.std(0)
    segs = [np.arange(i, i + 2) for i in range(0, 12, 2)]
    sim = np.array([[np.corrcoef(Pz[a].ravel(), Tz[b].ravel())[0, 1] for b in segs] for a in segs])
    np.testing.assert_array_equal(ident.ranks, (sim > np.diag(sim)[:, None]).sum(1))
    with pytest.raises(ConfigError, match="'segment_length' must be an integer >= 1"):
        identification(T, P, fold, segment_length=0)
    with pytest.raises(FitError, match="at least 2 held-out segments"):
        identification(T, P, fold, segment_length=7)


def test_roc_auc_matches_sklearn(rng):
    labels = rng.random((80, 3)) < 0.3
    scores = labels + rng.standard_normal((80, 3))
    expected = [roc_auc_score(labels[:, j], scores[:, j]) for j in range(3)]
    np.testing.assert_allclose(roc_auc(labels, scores), expected)
    assert np.isnan(roc_auc(np.zeros(10, bool), rng.standard_normal(10))).all()


def test_decoding_design_reads_responses_after_the_stimulus():
    Y = np.arange(10, dtype=np.float32)[:, None]
    D = decoding_design(Y, [6, 4], [1, 2])
    np.testing.assert_array_equal(D[:, 0], [1, 2, 3, 4, 5, 0, 7, 8, 9, 0])
    np.testing.assert_array_equal(D[:, 1], [2, 3, 4, 5, 0, 0, 8, 9, 0, 0])
