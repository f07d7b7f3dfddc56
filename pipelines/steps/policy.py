"""The failure policy, defined once for the command line and for the Airflow DAG.

- A subject's own bad input (``SUBJECT_ERRORS``, or a library failing on one of its files) fails
  that subject alone: it is recorded as failed and the others go on; the result is ``partial``.
- A transient S3 outage, a config or a model error is the run's, not a subject's: it stops the run
  (and a retry resumes from the caches).
- Nothing is published when no subject was fitted.
- Exit status: 0 for a complete result, 3 for a partial one (2 for a user error, in the CLI).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable

from ..config import AnalysisConfig, as_config
from ..errors import DatasetError, FitError, IntegrityError, NeuroflowError
from ..resultstore import open_store
from .results import SubjectFit

log = logging.getLogger("neuroflow")

EXIT_COMPLETE = 0
EXIT_PARTIAL = 3  # published, but some subjects failed (manifest status "partial")

SUBJECT_ERRORS = (DatasetError, FitError, IntegrityError)  # a subject's own bad input: others go on
PROGRAMMING_ERRORS = (NameError, AttributeError, ImportError, AssertionError, NotImplementedError, SyntaxError)


def as_subject_error(subject: str, err: Exception) -> Exception:
    """`err` if it is one of ours; else a DatasetError naming the subject (the cause chained, logged).

    A library raising TypeError/ValueError/MemoryError on one subject's odd file must fail that
    subject alone, with one line, never the whole analysis.
    """
    if isinstance(err, SUBJECT_ERRORS):
        return err
    if isinstance(err, PROGRAMMING_ERRORS):
        raise err  # a bug in neuroflow is never passed off as a subject's bad file
    if isinstance(err, NeuroflowError):
        # a transient S3 outage, a config or model error: the run's problem, not this subject's; the run
        # stops (and a retry resumes) rather than publishing a result with this subject marked failed
        raise err
    log.info("sub-%s: unexpected error", subject, exc_info=err)
    wrapped = DatasetError(f"sub-{subject}: its files could not be read ({type(err).__name__}: "
                           f"{str(err)[:300]}); check them (run with -v for details) or drop the subject")
    wrapped.__cause__ = err
    return wrapped


def failed_fit(subject: str, error: Exception | str) -> dict[str, Any]:
    """The record of a subject whose fit failed, for a partial manifest."""
    return {"subject": subject, "status": "failed", "error": str(error)[:1000], "metrics": {}}


def record_failed_fit(config: dict | AnalysisConfig, subject: str, error: Exception | str) -> dict[str, Any]:
    """Store a subject's failure under the analysis' work prefix, for publish to put in the manifest."""
    cfg = as_config(config)
    record = failed_fit(subject, error)
    open_store(cfg.output).put_bytes(json.dumps(record, sort_keys=True).encode(),
                                     f"_work/{cfg.analysis_id}/sub-{subject}/failed.json",
                                     content_type="application/json")
    return record


def collect_fits(config: dict | AnalysisConfig, subjects: list[str], fits: list[dict]) -> list[dict]:
    """The fits that finished, plus a failed record for every other subject of the analysis.

    A subject's failure is the one ``record_failed_fit`` stored, else "its fit task failed"
    (e.g. retries exhausted): a subject is never silently left out of the manifest.
    """
    cfg = as_config(config)
    store = open_store(cfg.output)
    done = {f["subject"]: f for f in fits if f}
    out = []
    for subject in subjects:
        if subject in done:
            out.append(done[subject])
            continue
        rel = f"_work/{cfg.analysis_id}/sub-{subject}/failed.json"
        if store.exists(rel):
            out.append(json.loads(store.get_bytes(rel)))
        else:
            out.append(failed_fit(subject, "its fit_subject task failed (see the task log)"))
    return out


def fit_or_fail(subject: str, fit: Callable[[], SubjectFit]) -> tuple[SubjectFit, Exception | None]:
    """Run one subject's fit under the policy: ``(its result, None)``, or ``(a failed record, the
    error)`` when the subject's own input is bad; any other error propagates (the run stops)."""
    try:
        return fit(), None
    except Exception as err:  # noqa: BLE001 - the policy sorts it: this subject's, or the run's (re-raised)
        err = as_subject_error(subject, err)
        log.info("sub-%s failed: %s", subject, err)
        return failed_fit(subject, err), err


def check_publishable(fits: list[SubjectFit], errors: list[Exception] | None = None) -> None:
    """Raise unless at least one subject was fitted: the first subject's own error when it is known
    (in-process), else one DatasetError naming every failed subject."""
    if any(f.get("status") == "ok" for f in fits):
        return
    if errors:
        raise errors[0]
    raise DatasetError("no subject was fitted; nothing is published: "
                       + "; ".join(f"sub-{f['subject']}: {f.get('error')}" for f in fits))


def exit_status(result: dict[str, Any]) -> int:
    """The command line's exit status for a published result."""
    return EXIT_COMPLETE if result["status"] == "complete" else EXIT_PARTIAL
