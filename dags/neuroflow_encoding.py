"""neuroflow_encoding: one encoding analysis of one dataset version.

Trigger with a conf ``{"config": {...}}`` holding the analysis config (the same YAML
`neuroflow run` reads, as JSON). Each task is one call into ``pipelines.steps``
(the steps and failure policy ``neuroflow run`` uses too);
tasks pass only small dicts and S3 URIs. The publish task is the outlet of the
published-maps Asset, which downstream DAGs schedule on, and, through the
``neuroflow_results`` alias, of the dataset's own results Asset ``{output}/{dataset_id}``.

The feature and fit tasks run in the ``gpu`` pool, so GPU-bound tasks queue for the device
instead of fighting over it (create it once: ``airflow pools set gpu 1 "GPU-bound tasks"``;
set its slots to the number of GPUs). With CeleryExecutor, ``NEUROFLOW_GPU_QUEUE=gpu`` in
the DAG processor's environment also routes them to the workers listening on that queue.

Every task records its own peak resident memory (``VmHWM``, reset when the task starts:
``pipelines.taskmem``) in its log and as the XCom ``peak_rss_bytes``.
"""
from __future__ import annotations

import functools
import logging
import os
from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetAlias, Param, dag, get_current_context, task

PUBLISHED_MAPS = Asset(name="neuroflow_published_maps", uri="neuroflow://published-maps")
DATASET_RESULTS = AssetAlias(name="neuroflow_results")  # resolves to Asset("{output}/{dataset_id}")
GPU_POOL = "gpu"
GPU_TASK = {"pool": GPU_POOL, **({"queue": os.environ["NEUROFLOW_GPU_QUEUE"]}
                                 if os.environ.get("NEUROFLOW_GPU_QUEUE") else {})}

DEFAULT_ARGS = {
    "owner": "neuroflow",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(hours=2),
}
log = logging.getLogger(__name__)


def _measured(fn):
    """The task's own peak RSS (VmHWM since the task started) in its log and in XCom ``peak_rss_bytes``."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        from pipelines.taskmem import peak_rss_bytes, reset_peak  # standard library only

        reset_peak()
        try:
            return fn(*args, **kwargs)
        finally:
            peak = peak_rss_bytes()
            if peak is not None:
                log.info("task peak RSS: %.1f MiB", peak / 2**20)
                try:
                    get_current_context()["ti"].xcom_push(key="peak_rss_bytes", value=peak)
                except Exception as err:  # noqa: BLE001 - a measurement never fails the task
                    log.warning("task peak RSS not recorded in XCom: %s", err)
    return run


def _credentials() -> None:
    """S3 credentials from the Airflow connection ``neuroflow_s3`` when it exists (plugins/neuroflow_aws.py)."""
    import sys
    from pathlib import Path

    plugins = str(Path(__file__).resolve().parents[1] / "plugins")
    if plugins not in sys.path:  # the repository's plugins folder, wherever Airflow's points
        sys.path.append(plugins)
    from neuroflow_aws import export_aws_connection

    export_aws_connection()


def _config_schema() -> dict:
    """The config's JSON Schema (pydantic), so a bad trigger is refused before a run starts."""
    from pipelines.config import AnalysisConfig  # light: pydantic + yaml only

    return AnalysisConfig.model_json_schema()


@dag(
    dag_id="neuroflow_encoding",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    tags=["neuroflow", "encoding"],
    default_args=DEFAULT_ARGS,
    params={"config": Param(None, **_config_schema(), description="the analysis config (see README)")},
    doc_md=__doc__,
)
def neuroflow_encoding():
    @task(execution_timeout=timedelta(minutes=30))
    @_measured
    def prepare() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.errors import ConfigError
        from pipelines.steps import prepare as run

        context = get_current_context()
        extra = sorted(set(context["dag_run"].conf or {}) - {"config"})
        if extra:  # a typo'd or smuggled key would be silently ignored: refuse the run instead
            raise AirflowFailException(f"the trigger conf has unknown keys {extra}; it takes only "
                                       '{"config": {...}} (the analysis config)')
        _credentials()
        try:
            return run(context["params"]["config"])
        except ConfigError as err:  # e.g. an output inside the dataset or another analysis: a retry cannot help
            raise AirflowFailException(str(err)) from err

    @task
    @_measured
    def feature_names(prepared: dict) -> list[str]:
        return prepared["feature_spaces"]

    @task
    @_measured
    def subject_labels(prepared: dict) -> list[str]:
        return prepared["subjects"]

    @task(map_index_template="{{ feature_label }}", **GPU_TASK)
    @_measured
    def extract_features(feature: str) -> dict:
        from pipelines.steps import extract_features as run

        _credentials()
        context = get_current_context()
        context["feature_label"] = feature
        return run(context["params"]["config"], feature)

    @task
    @_measured
    def fit_units(prepared: dict, features: list[dict]) -> list[dict]:
        from pipelines.steps import layer_units

        return layer_units(get_current_context()["params"]["config"], prepared["subjects"], list(features))

    # each layer of a sweep, each subject: its own task (a problem with a subject's input is left to its
    # fit_subject, which records it; so this task fails only on a crash, and a retry resumes it)
    @task(map_index_template="sub-{{ unit_label }}", **GPU_TASK)
    @_measured
    def fit_layer(unit: dict, features: list[dict]) -> dict:
        from pipelines.steps import fit_layer as run

        _credentials()
        context = get_current_context()
        context["unit_label"] = f"{unit['subject']} {unit['feature']} {unit['space']}"
        return run(context["params"]["config"], unit, list(features))

    # after the layer fits, if any (none: that mapped task is skipped, hence none_failed)
    @task(map_index_template="sub-{{ subject_label }}", trigger_rule="none_failed", **GPU_TASK)
    @_measured
    def fit_subject(subject: str, features: list[dict], layers: list[dict] | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.steps import fit_or_fail, record_failed_fit
        from pipelines.steps import fit_subject as run

        _credentials()
        context = get_current_context()
        context["subject_label"] = subject
        config = context["params"]["config"]
        fit, err = fit_or_fail(subject, lambda: run(config, subject, list(features)))  # the CLI's policy
        if err is not None:
            # this subject's own input is bad: a retry cannot help; the others go on, and publish
            # records it as failed in a partial manifest
            record_failed_fit(config, subject, err)
            raise AirflowFailException(f"sub-{subject}: {err}") from err
        return fit

    # after every subject's fit (a failed one too): the group level of those fitted ({"status": "off"} without
    # a 'group' section in the config)
    @task(trigger_rule="all_done_min_one_success")
    @_measured
    def group_level(prepared: dict, features: list[dict], fits: list[dict]) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.errors import ConfigError, DatasetError
        from pipelines.group.step import group_level as run
        from pipelines.steps import collect_fits

        _credentials()
        config = get_current_context()["params"]["config"]
        try:
            return run(config, prepared, collect_fits(config, prepared["subjects"], [f for f in fits if f]),
                       features=list(features))
        except (ConfigError, DatasetError) as err:  # a bad atlas or transform: a retry cannot help
            raise AirflowFailException(str(err)) from err

    # a failed subject must not stop the others from publishing; a failed prepare leaves nothing to publish
    @task(outlets=[PUBLISHED_MAPS, DATASET_RESULTS], trigger_rule="all_done_min_one_success")
    @_measured
    def publish(prepared: dict, features: list[dict], fits: list[dict], group: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.config import as_config
        from pipelines.errors import NeuroflowError, PublishConflictError
        from pipelines.steps import check_publishable, collect_fits
        from pipelines.steps import publish_from_config as run

        _credentials()
        context = get_current_context()
        config = context["params"]["config"]
        everyone = collect_fits(config, prepared["subjects"], [f for f in fits if f])
        try:
            check_publishable(everyone)  # the CLI's policy: nothing is published when no subject was fitted
        except NeuroflowError as err:
            raise AirflowFailException(str(err)) from err
        if group is None and config.get("group") is not None:  # never a manifest without the group it was asked for
            raise AirflowFailException("the group_level task failed (see its log); nothing was published")
        try:
            result = run(config, prepared, list(features), everyone, airflow_run_id=context["run_id"],
                         group=group)
        except PublishConflictError as err:  # a complete (or better partial) result stands: no retry
            raise AirflowFailException(str(err)) from err
        cfg = as_config(config)
        output, dataset_id = cfg.output, cfg.dataset.dataset_id
        extra = {"manifest_uri": result["manifest_uri"], "output": output, "dataset": dataset_id,
                 "version": cfg.dataset.version, "analysis_id": prepared["analysis_id"],
                 "status": result["status"]}
        context["outlet_events"][PUBLISHED_MAPS].extra = extra
        context["outlet_events"][DATASET_RESULTS].add(Asset(uri=f"{output}/{dataset_id}"), extra=extra)
        return result

    @task
    @_measured
    def check_complete(result: dict) -> None:
        """Fail the run when the published analysis is partial, naming the failed subjects."""
        from airflow.sdk.exceptions import AirflowFailException

        if result["status"] != "complete":
            raise AirflowFailException(f"published a partial analysis ({result['manifest_uri']}): subjects "
                                       f"{result.get('failed_subjects')} failed; see their fit_subject logs")

    prepared = prepare()
    features = extract_features.expand(feature=feature_names(prepared))
    layers = fit_layer.partial(features=features).expand(unit=fit_units(prepared, features))
    fits = fit_subject.partial(features=features, layers=layers).expand(subject=subject_labels(prepared))
    check_complete(publish(prepared, features, fits, group_level(prepared, features, fits)))


neuroflow_encoding()
