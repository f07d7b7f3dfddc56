"""The manifest's ``methods``: how every published number was made, so that it can be reproduced.

States the metrics and their conventions, how folds and runs were aggregated, which runs trained
and tested each fold (per subject, from ``fit_subject``'s ``folds``), whether repeats were
averaged, and what the published models are. Written by ``publish``; read by people and by
:mod:`pipelines.models.predict`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["methods_block"]


def methods_block(cfg: Any, fits: list[dict]) -> dict[str, Any]:
    """The ``methods`` entry of a manifest.

    Parameters
    ----------
    cfg : AnalysisConfig
    fits : the subjects' fit results (``folds`` per subject where the fit recorded them).
    """
    model = cfg.model
    if model.test_stories:
        cv = (f"one outer fold: the runs of stories {list(model.test_stories)} held out, the model trained on "
              "the others")
    elif model.cv == "leave_one_run_out":
        cv = "leave-one-run-out: each run held out once, the model trained on the others"
    else:
        cv = (f"{model.n_folds} contiguous blocks of samples, each held out once; training samples within the "
              "longest delay or lag of the held-out block are dropped (gap)")
    repeats = cfg.dataset.responses.repeats
    methods: dict[str, Any] = {
        "metrics": {
            "r": "Pearson correlation between the held-out prediction and the held-out responses (z-scored "
                 "per run), computed within each outer fold",
            "r2": "coefficient of determination 1 - SS_res / SS_tot of the held-out prediction, within each "
                  "outer fold (can be negative)",
            "rnorm": "r / r_max, where r_max is the noise ceiling of the repeated story's averaged responses "
                     "(explainable variance, bias-corrected, Spearman-Brown), only for targets whose split-half "
                     "correlation is significant (p < 0.05 against phase-randomised halves) and r_max >= 0.1",
            "mean_r, median_r, max_r": "over the valid targets (finite, not constant) of one subject",
            "n_significant": "targets with BH-FDR q < 0.05 of permutation p-values (model.permutations), "
                             "each fold tested exactly, folds combined by Simes",
        },
        "aggregation": "scores are computed within each held-out fold and averaged over folds weighted by the "
                       "fold's number of samples; a target's alpha is the geometric mean of the folds' alphas",
        "cross_validation": {
            "outer": cv,
            "inner": "leave-one-run-out inside the outer training runs (or blocks), one alpha per target from "
                     f"{list(model.alphas)} by mean squared error (ties to the larger alpha)",
            "never_shuffled": True,
        },
        "standardisation": "features and responses z-scored within each run (ddof 0) before the fit",
        "delays": list(model.delays), "resample": model.resample,
        "repeats": {"policy": repeats,
                    "averaged": repeats == "mean",
                    "note": "repeated presentations of a story are averaged before the fit (mean), the first "
                            "one kept (first), or refused (error)"},
        "folds": {f["subject"]: f["folds"] for f in fits if f.get("status") == "ok" and f.get("folds")},
    }
    if model.kind == "banded_ridge":
        methods["banded"] = ("every feature space a band of one banded ridge (himalaya's random search of "
                             f"{model.n_iter} band weights); r2split is the product-measure split of the held-out R²")
    methods["models"] = ({"published": True, "dtype": cfg.publish.models_dtype,
                          "what": "per subject and feature space, artifacts of kind encoding_model: safetensors "
                                  "weights, intercepts and per-run z-score statistics, with the feature recipe"}
                         if cfg.publish.models else {"published": False})
    return methods
