"""Step 1, prepare: the config checked against the dataset before any compute.

Reads the dataset's listing, sidecars and word timings; writes nothing but the download cache.
A subject whose own files are bad is recorded in ``subject_problems`` (its fit reports it); the
others go on.
"""
from __future__ import annotations

from pathlib import Path

from .. import flatmap
from ..cache import default_cache_dir
from ..config import AnalysisConfig, as_config
from ..errors import DatasetError
from ..ingest import Ingest, check_subjects, find_runs, load_run_words, open_dataset, plan_runs
from ..publish import check_output_place
from ..resultstore import open_store
from .policy import as_subject_error
from .results import Prepared


def prepare(config: dict | AnalysisConfig, *, cache_dir: str | Path | None = None,
            ingest: Ingest | None = None) -> Prepared:
    """Validate the config against the dataset: version, subjects, runs, word timings, output bucket
    (and, with ``maps.pycortex``, each subject's pycortex database).

    ``ingest``: the dataset already opened for this config (``neuroflow validate`` shares it with
    its table, so the listing is read and each subject's runs planned once); opened here if None.
    """
    cfg = as_config(config)
    check_output_place(cfg)  # never write into the dataset or into another analysis' folder
    if ingest is None:
        ingest = open_dataset(cfg, cache_dir or default_cache_dir())
    subjects = check_subjects(ingest)
    stories: dict[str, int] = {}
    problems: dict[str, str] = {}
    flatmaps = flatmap.enabled(cfg)
    for subject in subjects:
        try:
            for run in plan_runs(ingest, subject):
                stories[str(run.story)] = int(len(load_run_words(ingest, run)))
            if flatmaps:
                flatmap.check_database(ingest, subject, find_runs(ingest, subject)[0])
        except Exception as err:  # noqa: BLE001 - reported as this subject's failure by its fit; the others go on
            problems[subject] = str(as_subject_error(subject, err))
    if problems and len(problems) == len(subjects):
        raise DatasetError(next(iter(problems.values())))
    open_store(cfg.output).ensure_bucket()
    return {
        "analysis_id": cfg.analysis_id,
        "config_hash": cfg.config_hash,
        "publish_uri": cfg.publish_prefix,
        "subjects": subjects,
        "feature_spaces": [f.name for f in cfg.features],
        "stories": stories,
        "n_words": int(sum(stories.values())),
        "subject_problems": problems,
        "files_read": [r.as_dict() for r in ingest.files_read.values()],
    }
