"""neuroflow_watch: trigger ``neuroflow_encoding`` when a watched dataset changes.

On its schedule it reads, for every watched dataset, the snapshot version the source declares
(``CHANGES``, else the ``DatasetDOI``) and a fingerprint of its inputs, and triggers
``neuroflow_encoding`` once per new (snapshot, inputs, config) with the entry's config
template, versioned. What it has seen is kept in ``{output}/_state/watch/<name>.json``,
claimed with a conditional write so two watchers never trigger the same snapshot twice;
the run id is deterministic too (``watch__<name>__<version>__<hash>``). Only stale stages
of the triggered run recompute: features and fits come from the content-hash caches.

The watch list is the Airflow Variable ``neuroflow_watchlist`` (YAML/JSON text, or the path of a
file holding it) when set, else ``watched_datasets.yaml`` beside this file. The schedule is
``NEUROFLOW_WATCH_SCHEDULE`` (a cron expression or preset, read when the file is parsed;
default ``@hourly``).
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context, task

WATCHLIST_FILE = Path(__file__).with_name("watched_datasets.yaml")
WATCHLIST_VARIABLE = "neuroflow_watchlist"
ENCODING_DAG_ID = "neuroflow_encoding"

DEFAULT_ARGS = {
    "owner": "neuroflow",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=15),
}


def _trigger_kwargs(plan: dict) -> dict:
    """A plan -> the keyword arguments of one mapped TriggerDagRunOperator."""
    return {"trigger_run_id": plan["run_id"], "conf": plan["conf"]}


@dag(
    dag_id="neuroflow_watch",
    schedule=os.environ.get("NEUROFLOW_WATCH_SCHEDULE", "@hourly"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["neuroflow", "watch"],
    default_args=DEFAULT_ARGS,
    params={"stale_after_s": Param(3600, type="integer", minimum=0,
                                   description="re-trigger a claim never confirmed after this many seconds")},
    doc_md=__doc__,
)
def neuroflow_watch():
    @task
    def check_datasets() -> dict:
        from airflow.sdk import Variable

        from pipelines.watch import load_watchlist, plan_all

        context = get_current_context()
        text = Variable.get(WATCHLIST_VARIABLE, default=None)
        entries = load_watchlist(text, base_dir=WATCHLIST_FILE.parent) if text else load_watchlist(WATCHLIST_FILE)
        return plan_all(entries, stale_after_s=context["params"]["stale_after_s"],
                        watcher=f"{context['dag_run'].dag_id}/{context['run_id']}")

    @task
    def plans(checked: dict) -> list[dict]:
        return checked["plans"]

    # one trigger per new snapshot; a run id that exists already is skipped, never re-run
    trigger = TriggerDagRunOperator.partial(
        task_id="trigger_encoding",
        trigger_dag_id=ENCODING_DAG_ID,
        logical_date=None,
        skip_when_already_exists=True,
        map_index_template="{{ task.trigger_run_id }}",
    )

    @task(trigger_rule="all_done")
    def record(checked: dict) -> dict:
        """Mark claims whose run now exists as triggered; fail the run if a dataset could not be read."""
        from airflow.sdk.exceptions import AirflowFailException

        from pipelines.watch import confirm

        ti = get_current_context()["ti"]
        done = [p["run_id"] for p in checked["plans"]
                if ti.get_dr_count(dag_id=ENCODING_DAG_ID, run_ids=[p["run_id"]]) and confirm(p)]
        missing = [p["run_id"] for p in checked["plans"] if p["run_id"] not in done]
        if checked["errors"] or missing:
            raise AirflowFailException(f"watch errors: {checked['errors']}; "
                                       f"runs not triggered (re-planned later): {missing}")
        return {"triggered": done}

    checked = check_datasets()
    triggered = trigger.expand_kwargs(plans(checked).map(_trigger_kwargs))
    triggered >> record(checked)


neuroflow_watch()
