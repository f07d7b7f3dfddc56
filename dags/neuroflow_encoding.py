"""neuroflow_encoding: one encoding analysis of one dataset version.

Trigger with a conf ``{"config": {...}}`` holding the analysis config (the same YAML
`neuroflow run` reads, as JSON). Each task is one call into ``pipelines.stages``;
tasks pass only small dicts and S3 URIs. The publish task is the outlet of the
published-maps Asset, which downstream DAGs schedule on, and, through the
``neuroflow_results`` alias, of the dataset's own results Asset ``{output}/{dataset_id}``.

The feature and fit tasks run in the ``gpu`` pool, so GPU-bound tasks queue for the device
instead of fighting over it (create it once: ``airflow pools set gpu 1 "GPU-bound tasks"``;
set its slots to the number of GPUs). With CeleryExecutor, ``NEUROFLOW_GPU_QUEUE=gpu`` in
the DAG processor's environment also routes them to the workers listening on that queue.
"""
from __future__ import annotations

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
    def prepare() -> dict:
        from pipelines.stages import prepare as run

        return run(get_current_context()["params"]["config"])

    @task
    def feature_names(prepared: dict) -> list[str]:
        return prepared["feature_spaces"]

    @task
    def subject_labels(prepared: dict) -> list[str]:
        return prepared["subjects"]

    @task(map_index_template="{{ feature_label }}", **GPU_TASK)
    def extract_features(feature: str) -> dict:
        from pipelines.stages import extract_features as run

        context = get_current_context()
        context["feature_label"] = feature
        return run(context["params"]["config"], feature)

    @task(map_index_template="sub-{{ subject_label }}", **GPU_TASK)
    def fit_subject(subject: str, features: list[dict]) -> dict:
        from pipelines.stages import fit_subject as run

        context = get_current_context()
        context["subject_label"] = subject
        return run(context["params"]["config"], subject, list(features))

    @task(outlets=[PUBLISHED_MAPS, DATASET_RESULTS])
    def publish(prepared: dict, features: list[dict], fits: list[dict]) -> dict:
        from pipelines.stages import publish_from_config as run

        context = get_current_context()
        config = context["params"]["config"]
        result = run(config, prepared, list(features), list(fits), airflow_run_id=context["run_id"])
        output = config["output"].rstrip("/")
        dataset_id = config["dataset"]["source"].rstrip("/").rsplit("/", 1)[-1]
        extra = {"manifest_uri": result["manifest_uri"], "output": output, "dataset": dataset_id,
                 "version": config["dataset"]["version"], "analysis_id": prepared["analysis_id"],
                 "status": result["status"]}
        context["outlet_events"][PUBLISHED_MAPS].extra = extra
        context["outlet_events"][DATASET_RESULTS].add(Asset(uri=f"{output}/{dataset_id}"), extra=extra)
        return result

    prepared = prepare()
    features = extract_features.expand(feature=feature_names(prepared))
    fits = fit_subject.partial(features=features).expand(subject=subject_labels(prepared))
    publish(prepared, features, fits)


neuroflow_encoding()
