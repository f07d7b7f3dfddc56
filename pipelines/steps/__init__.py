"""The analysis as four steps of one shape, and the flow that runs them.

Each step is a plain function taking the config (a dict or an
:class:`~pipelines.config.AnalysisConfig`) and the previous steps' typed results
(:mod:`pipelines.steps.results`), and returning its own. The command line runs them through
:func:`run_analysis`; the ``neuroflow_encoding`` DAG runs each as a task. Both follow the one
failure policy of :mod:`pipelines.steps.policy`.
"""
from .features import extract_features
from .fit_layer import fit_layer, layer_units
from .fit_subject import fit_subject
from .flow import run_analysis
from .policy import (SUBJECT_ERRORS, check_publishable, collect_fits, exit_status, failed_fit, fit_or_fail,
                     record_failed_fit)
from .prepare import prepare
from .publish import publish_from_config
from .results import FeatureSet, Prepared, Published, SubjectFit

__all__ = ["prepare", "extract_features", "fit_subject", "fit_layer", "layer_units", "publish_from_config", "run_analysis",
           "SUBJECT_ERRORS", "check_publishable", "collect_fits", "exit_status", "failed_fit", "fit_or_fail",
           "record_failed_fit", "Prepared", "FeatureSet", "SubjectFit", "Published"]
