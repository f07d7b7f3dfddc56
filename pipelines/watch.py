"""Watching datasets for new snapshots: what ``neuroflow_watch`` decides, free of Airflow.

For each watched dataset (``dags/watched_datasets.yaml``, or the Airflow Variable
``neuroflow_watchlist``) the watcher reads

- the snapshot version the source declares (the first version line of ``CHANGES``, else the
  ``DatasetDOI``: the same rule as :func:`pipelines.ingest.dataset_version`), and
- a fingerprint of the inputs an analysis of it reads: key, size and ETag of every file,
  other subjects' folders left out, plus the analysis id of the config it would run.

When the pair is new it *claims* it in a state object ``{output}/_state/watch/<name>.json``
with a conditional write (``If-Match`` on the ETag it read, ``If-None-Match: *`` when there
was none), so that of two watchers racing exactly one wins, and returns a trigger: a
deterministic run id (``watch__<name>__<version>__<fingerprint>``) and the conf for
``neuroflow_encoding``. The trigger itself is idempotent (a run id exists once), and a
claim is marked ``triggered`` only once that run exists; a claim left ``claimed`` (the
watcher died between claim and trigger) is planned again, with the same run id, after
``stale_after`` seconds.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from .config import apply_overrides, parse_config
from .demo import packaged_model_dir
from .errors import ConfigError, DatasetError
from .ingest import dataset_version
from .resultstore import open_store
from .s3 import s3_client
from .storage import DatasetSource

log = logging.getLogger("neuroflow")

STATE_DIR = "_state/watch"
STATE_SCHEMA_VERSION = 1
MAX_SEEN = 200
CLAIM_ATTEMPTS = 5
DEFAULT_STALE_AFTER_S = 3600
_ENTRY_KEYS = {"source", "config", "set", "name"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --- the watch list -----------------------------------------------------------------

@dataclass(frozen=True)
class WatchEntry:
    """One watched dataset: where it lives and the config template its analysis uses.

    ``config`` is a path to a YAML config (relative paths are looked up next to the watch
    list, then in its parent folder, i.e. the repository root) or an inline mapping;
    ``set`` holds ``key.path: value`` overrides applied to it (as ``neuroflow run --set``).
    ``dataset.source`` is always this entry's ``source`` and ``dataset.version`` the
    snapshot version found. ``name`` (default: the dataset id) names the state object.
    """

    source: str
    config: str | dict
    set: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    base_dir: str = "."

    @property
    def state_name(self) -> str:
        return self.name or self.source.rstrip("/").rsplit("/", 1)[-1]


def load_watchlist(text_or_path: str | Path, base_dir: str | Path | None = None) -> list[WatchEntry]:
    """Parse a watch list (YAML or JSON text, or a path to a file holding it).

    The format is ``{"datasets": [{"source": ..., "config": ..., "set": {...}, "name": ...}]}``
    (a bare list of entries is accepted too).
    """
    where = "watch list"
    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                          and text_or_path.strip().endswith((".yaml", ".yml", ".json"))):
        path = Path(text_or_path)
        try:
            text = path.read_text()
        except FileNotFoundError as err:
            raise ConfigError(f"{path}: watch list not found") from err
        where = str(path)
        base_dir = base_dir or path.parent
    else:
        text = str(text_or_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML/JSON ({err})") from err
    items = data.get("datasets") if isinstance(data, dict) else data
    if items is None:
        items = []
    if not isinstance(items, list):
        raise ConfigError(f"{where}: 'datasets' must be a list of entries; got {type(items).__name__}")
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: datasets[{i}] must be a mapping with 'source' and 'config'")
        unknown = sorted(set(item) - _ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{where}: datasets[{i}] has unknown key(s) {unknown}; valid keys: "
                              f"{sorted(_ENTRY_KEYS)}")
        for key in ("source", "config"):
            if not item.get(key):
                raise ConfigError(f"{where}: datasets[{i}] has no '{key}'")
        overrides = item.get("set") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: datasets[{i}].set must map key.path to a value")
        entry = WatchEntry(source=str(item["source"]).rstrip("/"), config=item["config"], set=dict(overrides),
                           name=str(item.get("name") or ""), base_dir=str(base_dir or "."))
        if not _NAME.match(entry.state_name):
            raise ConfigError(f"{where}: datasets[{i}] name {entry.state_name!r} must be letters, digits, "
                              "'.', '_' or '-'; set 'name'")
        entries.append(entry)
    names = [e.state_name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{where}: several entries share the name(s) {dupes}; give each a distinct 'name'")
    return entries


def template_config(entry: WatchEntry) -> dict[str, Any]:
    """The entry's config template as a dict, with its overrides applied (not yet versioned)."""
    if isinstance(entry.config, dict):
        data = json.loads(json.dumps(entry.config))
    else:
        path = Path(entry.config)
        if not path.is_absolute():
            base = Path(entry.base_dir)
            candidates = [base / path, base.parent / path]
            path = next((c for c in candidates if c.is_file()), candidates[0])
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as err:
            raise ConfigError(f"watch entry {entry.state_name!r}: config template {path} not found") from err
    data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in entry.set.items()])
    for feat in data.get("features") or []:
        if isinstance(feat, dict) and feat.get("model") == "MODEL_DIR":  # the demo's placeholder
            feat["model"] = str(packaged_model_dir())
    data.setdefault("dataset", {})["source"] = entry.source
    return data


# --- what the source holds now ------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """The state of a dataset source: declared version and a fingerprint of its inputs."""

    version: str | None
    fingerprint: str
    n_files: int


class _Reader:
    """Just enough of :class:`pipelines.ingest.Ingest` for ``dataset_version``: fresh reads, no cache."""

    def __init__(self, source: DatasetSource, tmp: Path):
        self.source = source
        self._tmp = tmp

    def fetch(self, key: str) -> Path:
        info = self.source.info(key)
        if not self.source.is_s3:  # read in place, through the same checks (nothing outside the dataset)
            return self.source.fetch(key)
        dest = self._tmp / key.replace("/", "__")
        full = f"{self.source.prefix}/{key}" if self.source.prefix else key
        try:
            body = s3_client(self.source.bucket).get_object(Bucket=self.source.bucket, Key=full)["Body"].read()
        except Exception as err:  # noqa: BLE001
            from .s3 import translate_s3_error

            raise translate_s3_error(err, f"{self.source.source}/{key}") from err
        if len(body) != info.size:
            raise DatasetError(f"{self.source.source}/{key}: changed while being read; run again")
        dest.write_bytes(body)
        return dest


def _relevant(key: str, subjects: set[str]) -> bool:
    """Files an analysis of `subjects` could read: everything but other subjects' folders."""
    m = re.search(r"(?:^|/)sub-([A-Za-z0-9]+)/", key)
    return m is None or m.group(1) in subjects


def read_snapshot(source: str, subjects: list[str] | None = None) -> Snapshot:
    """The version `source` declares now and the fingerprint of the files `subjects` would use."""
    ds = DatasetSource(source, "_watch", tempfile.gettempdir())
    listing = ds.list_files()
    wanted = set(subjects or [])
    h = hashlib.sha256()
    n = 0
    for key in sorted(listing):
        if subjects is not None and not _relevant(key, wanted):
            continue
        info = listing[key]
        h.update(json.dumps([key, info.size, info.etag, info.annex_key]).encode())
        n += 1
    with tempfile.TemporaryDirectory(prefix="neuroflow-watch-") as tmp:
        version = dataset_version(_Reader(ds, Path(tmp)))
    return Snapshot(version=version, fingerprint=h.hexdigest()[:16], n_files=n)


# --- the seen record ----------------------------------------------------------------

def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


class WatchState:
    """The seen record of one watched dataset, read and written with conditional puts."""

    def __init__(self, output: str, name: str):
        self.store = open_store(output)
        self.rel = f"{STATE_DIR}/{name}.json"
        self.uri = self.store.uri_of(self.rel)

    def read(self) -> tuple[dict[str, Any], str | None]:
        """(record, ETag); an empty record and None when there is none yet."""
        body, etag = self.store.get_with_etag(self.rel)  # S3 or a local folder alike
        if body is None:
            return {"schema_version": STATE_SCHEMA_VERSION, "seen": []}, None
        try:
            record = json.loads(body)
            if not isinstance(record.get("seen"), list):
                raise ValueError("no 'seen' list")
        except ValueError as err:
            raise DatasetError(f"{self.uri}: the watch state is unreadable ({err}); delete it to start over "
                               "(the next watch run then triggers each watched dataset once)") from err
        return record, etag

    def write(self, record: dict[str, Any], etag: str | None) -> bool:
        """Replace the record if it is still the one read (ETag); False when another writer won."""
        body = json.dumps(record, indent=2, sort_keys=True).encode()
        return self.store.put_if(self.rel, body, "application/json", etag)


# --- deciding -----------------------------------------------------------------------

def run_id_for(name: str, version: str | None, fingerprint: str, analysis_id: str) -> str:
    """The deterministic run id of the encoding run for one snapshot and config."""
    key = hashlib.sha256(f"{fingerprint}:{analysis_id}".encode()).hexdigest()[:12]
    return f"watch__{name}__{version or 'unversioned'}__{key}"


def plan_entry(entry: WatchEntry, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
               now: datetime | None = None, watcher: str = "") -> dict[str, Any] | None:
    """Claim the entry's current snapshot if it was never seen; return the trigger, else None."""
    data = template_config(entry)
    subjects = [str(s)[4:] if str(s).startswith("sub-") else str(s)
                for s in (data.get("dataset") or {}).get("subjects") or []] or None
    snap = read_snapshot(entry.source, subjects)
    if snap.version is not None:
        data["dataset"]["version"] = snap.version
    cfg = parse_config(data, origin=f"watch entry {entry.state_name!r}")
    run_id = run_id_for(entry.state_name, cfg.dataset.version, snap.fingerprint, cfg.analysis_id)
    state = WatchState(cfg.output, entry.state_name)
    for _ in range(CLAIM_ATTEMPTS):
        t = now or _now()
        record, etag = state.read()
        seen = next((s for s in record["seen"] if s.get("run_id") == run_id), None)
        if seen is not None:
            claimed = datetime.fromisoformat(seen["claimed_at"])
            if seen.get("status") == "triggered" or t - claimed < timedelta(seconds=stale_after_s):
                log.info("%s: version %s (inputs %s) already %s; nothing to trigger", entry.state_name,
                         cfg.dataset.version, snap.fingerprint, seen.get("status"))
                return None
            reason = f"claim of {seen['claimed_at']} never confirmed; triggering again (same run id)"
            seen["claimed_at"] = _iso(t)
            seen["watcher"] = watcher
        else:
            last = record["seen"][-1] if record["seen"] else None
            if last is None:
                reason = f"first look at {entry.source}: version {cfg.dataset.version}"
            elif last.get("version") != cfg.dataset.version:
                reason = f"new snapshot: version {last.get('version')} -> {cfg.dataset.version}"
            elif last.get("fingerprint") != snap.fingerprint:
                reason = f"inputs changed within version {cfg.dataset.version}"
            else:
                reason = f"analysis changed: {last.get('analysis_id')} -> {cfg.analysis_id}"
            record["seen"].append({"run_id": run_id, "version": cfg.dataset.version,
                                   "fingerprint": snap.fingerprint, "n_files": snap.n_files,
                                   "analysis_id": cfg.analysis_id, "status": "claimed",
                                   "claimed_at": _iso(t), "watcher": watcher, "reason": reason})
            record["seen"] = record["seen"][-MAX_SEEN:]
        record.update({"schema_version": STATE_SCHEMA_VERSION, "name": entry.state_name, "source": entry.source})
        if state.write(record, etag):
            log.info("%s: %s -> trigger %s", entry.state_name, reason, run_id)
            return {"name": entry.state_name, "source": entry.source, "version": cfg.dataset.version,
                    "fingerprint": snap.fingerprint, "analysis_id": cfg.analysis_id, "run_id": run_id,
                    "reason": reason, "state_uri": state.uri, "output": cfg.output, "conf": {"config": data}}
        log.info("%s: another watcher updated %s first; reading it again", entry.state_name, state.uri)
    raise DatasetError(f"{state.uri}: could not update the watch state after {CLAIM_ATTEMPTS} attempts "
                       "(other writers kept winning); the next watch run tries again")


def plan_all(entries: list[WatchEntry], **kwargs) -> dict[str, list]:
    """Plans for every entry; an entry that fails is reported, the others still planned."""
    plans, errors = [], []
    for entry in entries:
        try:
            plan = plan_entry(entry, **kwargs)
        except Exception as err:  # noqa: BLE001 - one unreachable dataset must not hide the others
            log.warning("%s: %s", entry.state_name, err)
            errors.append({"name": entry.state_name, "source": entry.source, "error": f"{type(err).__name__}: {err}"})
            continue
        if plan is not None:
            plans.append(plan)
    return {"plans": plans, "errors": errors}


def confirm(plan: dict[str, Any], *, now: datetime | None = None) -> bool:
    """Mark the plan's claim ``triggered`` (its run exists). False when the claim is gone."""
    state = WatchState(plan["output"], plan["name"])
    for _ in range(CLAIM_ATTEMPTS):
        record, etag = state.read()
        seen = next((s for s in record["seen"] if s.get("run_id") == plan["run_id"]), None)
        if seen is None:
            return False
        if seen.get("status") == "triggered":
            return True
        seen["status"] = "triggered"
        seen["triggered_at"] = _iso(now or _now())
        if state.write(record, etag):
            return True
    raise DatasetError(f"{state.uri}: could not record the trigger of {plan['run_id']}; "
                       "the next watch run re-plans it with the same run id")

