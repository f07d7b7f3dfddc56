"""neuroflow_insilico: in-silico experiments on every newly published analysis.

Scheduled on the ``neuroflow_published_maps`` Asset: each ``neuroflow_encoding`` publish emits an
event whose extra holds the manifest URI. For each such manifest (or the ``manifest_uri`` param of
a manual run) whose analysis publishes encoding models, it selects the candidate sentences
predicted to drive and to suppress each model's best-predicted targets and runs the configured
contrasts (``pipelines.models.experiments``). The experiment is the ``experiment`` param, else the
Airflow Variable ``neuroflow_insilico`` (JSON); with neither, there is nothing to do. Results go to
``{output}/_insilico/{dataset}/{version}/{analysis_id}/``, ``summary.json`` last.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task

# the same Asset the publish task of neuroflow_encoding is the outlet of
PUBLISHED_MAPS = Asset(name="neuroflow_published_maps", uri="neuroflow://published-maps")

DEFAULT_ARGS = {
    "owner": "neuroflow",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=5),
    "execution_timeout": timedelta(hours=1),
}


@dag(
    dag_id="neuroflow_insilico",
    schedule=[PUBLISHED_MAPS],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["neuroflow", "consumer", "insilico"],
    default_args=DEFAULT_ARGS,
    params={
        "manifest_uri": Param(None, type=["null", "string"], pattern=r"^(s3://|file:///|/).+/manifest\.json$",
                              description="a published manifest to experiment on (manual runs; else the "
                                          "triggering events')"),
        "experiment": Param(None, type=["null", "object"],
                            description="{candidates: [sentences], n, top, contrasts: [{name, a, b}]}; "
                                        "default: the Variable neuroflow_insilico"),
    },
    doc_md=__doc__,
)
def neuroflow_insilico():
    @task
    def published_manifests() -> list[str]:
        from pipelines.models.experiments import manifests_of_events

        context = get_current_context()
        extras = [event.extra for events in context["triggering_asset_events"].values() for event in events]
        uris = manifests_of_events(extras)
        if context["params"].get("manifest_uri") and context["params"]["manifest_uri"] not in uris:
            uris.append(context["params"]["manifest_uri"])
        return uris

    @task
    def experiment() -> dict | None:
        import json

        from airflow.sdk import Variable
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.errors import ConfigError
        from pipelines.models.experiments import check_experiment

        given = get_current_context()["params"].get("experiment")
        try:
            if given is None:
                raw = Variable.get("neuroflow_insilico", default=None)
                given = json.loads(raw) if isinstance(raw, str) else raw
            return None if given is None else check_experiment(given)
        except (ConfigError, json.JSONDecodeError) as err:  # a bad experiment: a retry cannot help
            raise AirflowFailException(f"in-silico experiment: {err}") from err

    @task(map_index_template="{{ manifest }}")
    def run_experiment(manifest_uri: str, spec: dict | None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.errors import ConfigError, DatasetError, IntegrityError
        from pipelines.models.experiments import run_experiment as run

        get_current_context()["manifest"] = manifest_uri
        if spec is None:
            return {"manifest_uri": manifest_uri, "skipped": "no experiment configured (param or Variable "
                                                             "neuroflow_insilico)"}
        try:
            return run(manifest_uri, spec)
        except (ConfigError, DatasetError, IntegrityError) as err:  # the analysis or the request: not transient
            raise AirflowFailException(f"{manifest_uri}: {err}") from err

    run_experiment.partial(spec=experiment()).expand(manifest_uri=published_manifests())


neuroflow_insilico()
