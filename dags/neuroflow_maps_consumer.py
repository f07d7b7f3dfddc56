"""neuroflow_maps_consumer: keep the gallery of published analyses up to date.

Scheduled on the ``neuroflow_published_maps`` Asset: every ``neuroflow_encoding`` publish
emits an event whose extra holds the manifest URI and the output root. For each output
root named by the triggering events (or the ``output`` param of a manual run) it rebuilds
``{output}/index.json`` and ``{output}/index.html`` from every published manifest; each is
replaced in one atomic PUT, so a reader never sees half an index.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, Param, dag, get_current_context, task

# the same Asset the publish task of neuroflow_encoding is the outlet of
PUBLISHED_MAPS = Asset(name="neuroflow_published_maps", uri="neuroflow://published-maps")

DEFAULT_ARGS = {
    "owner": "neuroflow",
    "retries": 3,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=5),
    "execution_timeout": timedelta(minutes=15),
}


@dag(
    dag_id="neuroflow_maps_consumer",
    schedule=[PUBLISHED_MAPS],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["neuroflow", "consumer"],
    default_args=DEFAULT_ARGS,
    params={"output": Param(None, type=["null", "string"],
                            pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file:///.+|/.+)$",
                            description="an output root to index (manual runs; else the triggering events')")},
    doc_md=__doc__,
)
def neuroflow_maps_consumer():
    @task
    def published_outputs() -> list[str]:
        from pipelines.gallery import output_of

        context = get_current_context()
        outputs = set()
        for events in context["triggering_asset_events"].values():
            for event in events:
                extra = event.extra or {}
                if extra.get("output"):
                    outputs.add(str(extra["output"]).rstrip("/"))
                elif extra.get("manifest_uri"):
                    outputs.add(output_of(extra["manifest_uri"]))
        if context["params"].get("output"):
            outputs.add(context["params"]["output"].rstrip("/"))
        return sorted(outputs)

    @task(map_index_template="{{ output_root }}")
    def update_gallery(output: str) -> dict:
        from pipelines.gallery import update_index

        get_current_context()["output_root"] = output
        return update_index(output)

    update_gallery.expand(output=published_outputs())


neuroflow_maps_consumer()
