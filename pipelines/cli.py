"""The ``neuroflow`` command line.

Errors a user can cause end in one line on stderr (``neuroflow: error: ...``) and exit
code 2, with no traceback; the last line ``neuroflow run`` prints is the manifest URI.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path, PurePosixPath

from .errors import NeuroflowError
from .models.commands import add_commands as add_model_commands

EXIT_USER_ERROR = 2


PROGRESS = logging.getLogger("neuroflow.progress")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Stage progress is always shown (stderr), so a long run in a batch job is never silent for
    # minutes; the libraries' own INFO lines (dask's cluster shutdown, ...) only with -v.
    PROGRESS.setLevel(logging.INFO)
    if not verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s neuroflow: %(message)s", datefmt="%H:%M:%S"))
        PROGRESS.handlers[:] = [handler]
        PROGRESS.propagate = False
    for noisy in ("distributed", "dask", "botocore", "urllib3", "transformers", "httpx", "numexpr", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _progress(stage: str, done: int, total: int) -> None:
    if not sys.stderr.isatty():  # a bar per stage on a terminal; plain lines elsewhere (nohup, CI, batch jobs)
        PROGRESS.info("stage %d/%d: %s", min(done + 1, total), total, stage)
        return
    width = 24
    filled = int(width * done / max(total, 1))
    print(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {stage}", file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    from .config import load_config
    from .run import format_summary
    from .steps import exit_status, run_analysis

    cfg = load_config(args.config, args.set)
    result = run_analysis(cfg, cache_dir=args.cache_dir, local_dir=args.local_dir, progress=_progress)
    for line in format_summary(result["metrics"]):
        print(line)
    failed = [f for f in result["fits"] if f.get("status") != "ok"]
    for f in failed:
        print(f"neuroflow: error: sub-{f['subject']} failed and is recorded so in the manifest: {f['error']}",
              file=sys.stderr)
    print(f"report: {result['report_path']}")
    print(result["manifest_uri"])
    return exit_status(result)  # the policy's: 0 complete, 3 partial


def cmd_validate(args) -> int:
    from .cache import default_cache_dir
    from .config import load_config
    from .ingest import open_dataset
    from .publish import check_output_place
    from .scaffold import survey, survey_table
    from .steps import prepare

    cfg = load_config(args.config, args.set)
    cache_dir = args.cache_dir or default_cache_dir()
    check_output_place(cfg)  # prepare's first check, before the dataset is listed
    ingest = open_dataset(cfg, cache_dir)  # one listing, each subject's runs planned once: prepare's and the table's

    def table() -> None:  # per subject and story: runs, samples, words, timing file, and each problem's fix
        for line in survey_table(survey(cfg, cache_dir, ingest)):
            print(line)

    try:
        info = prepare(cfg, cache_dir=cache_dir, ingest=ingest)
    except NeuroflowError:
        try:
            table()  # what was found, so the one error line comes with the rows that explain it
        except NeuroflowError:
            pass  # the dataset as a whole is unreadable: prepare's error says why
        raise
    table()
    print(f"ok: {cfg.dataset.dataset_id} {cfg.dataset.version}, subjects {', '.join(info['subjects'])}, "
          f"{info['n_words']} words, features {', '.join(info['feature_spaces'])}")
    print(f"would publish to {info['publish_uri']}")
    return 0


def cmd_init(args) -> int:
    from .cache import default_cache_dir
    from .scaffold import detect, write_config

    plan = detect(args.source, args.output, version=args.version, cache_dir=args.cache_dir or default_cache_dir())
    text = write_config(plan, args.file)
    if args.file is None:
        print(text, end="")
        return 0
    for note in plan.notes:
        print(f"init: {note}", file=sys.stderr)
    print(f"wrote {args.file}; check it with `neuroflow validate {args.file}`, run it with "
          f"`neuroflow run {args.file}`", file=sys.stderr)
    print(args.file)
    return 0


def cmd_maps_list(args) -> int:
    from .consume import scan_analyses
    from .manifest import printable

    rows, problems = scan_analyses(args.output_uri)
    for problem in problems:  # one bad manifest does not hide the others; it is named, not skipped silently
        print(f"neuroflow: warning: skipped {printable(problem['manifest_uri'])}: {printable(problem['error'], 400)}",
              file=sys.stderr)
    if not rows:
        print(f"no published analyses under {printable(args.output_uri)}")
        return 0
    print(f"{'dataset':<10} {'version':<8} {'analysis':<28} {'status':<9} {'subjects':<22} {'features':<20} best mean r")
    for r in rows:
        best = f"{r['best_mean_r']:.3f}" if r["best_mean_r"] is not None else "n/a"
        cells = [printable(r[k], 60) for k in ("dataset", "version", "analysis_id", "status")]
        subjects = printable(",".join(r["subjects"]), 22)[:22]
        features = printable(",".join(r["feature_spaces"]), 20)[:20]
        print(f"{cells[0]:<10} {cells[1]:<8} {cells[2]:<28} {cells[3]:<9} {subjects:<22} {features:<20} {best}")
        print(f"  {printable(r['manifest_uri'])}")
    return 0


def cmd_maps_show(args) -> int:
    from .manifest import printable, read_manifest

    m = read_manifest(args.manifest_uri)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))  # JSON escapes control characters itself
        return 0
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"{printable(m['dataset']['id'])} {printable(m['dataset']['version'])} "
          f"({printable(m['dataset']['source'])})  {printable(m['analysis_id'])}  {printable(m['status'])}")
    for sub, feats in sorted(m["metrics"].items()):
        for feat, s in sorted(feats.items()):
            print(f"  sub-{printable(sub, 40)} {printable(feat, 40)}: mean r {fmt(s['mean_r'])}, "
                  f"max r {fmt(s['max_r'])}, {s['n_valid']} targets")
    print("artifacts:")
    for a in m["artifacts"]:
        print(f"  {printable(a['path'])}  ({printable(a['kind'], 40)}, {a['bytes']} bytes)")
    return 0


def cmd_maps_get(args) -> int:
    from .consume import get_artifact

    dest = Path(args.dest or PurePosixPath(args.artifact).name)
    get_artifact(args.manifest_uri, args.artifact, dest, overwrite=args.overwrite)
    print(dest)
    return 0


def cmd_demo_data(args) -> int:
    from .demo import build_demo_dataset

    path = build_demo_dataset(Path(args.dest), model_dir=args.model, resolution_mm=args.resolution)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuroflow", description="Encoding models from BIDS datasets on S3.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress of each stage")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config value (YAML), e.g. --set model.alphas=[1,10]")
        sp.add_argument("--cache-dir", default=None, help="local download/cache folder "
                        "(default $NEUROFLOW_CACHE or ~/.cache/neuroflow)")

    r = sub.add_parser("run", help="run the whole analysis in-process; last line: manifest URI")
    with_config(r)
    r.add_argument("--local-dir", default=None, help="keep the published files here too")
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate", help="check config and dataset layout; fits nothing")
    with_config(v)
    v.set_defaults(func=cmd_validate)
    i = sub.add_parser("init", help="write a config for a dataset, detected from its own files")
    i.add_argument("source", help="the dataset: s3://bucket/prefix (OpenNeuro: s3://openneuro.org/dsNNNNNN) or a "
                                  "local folder")
    i.add_argument("--output", required=True,
                   help="where `neuroflow run` publishes: s3://bucket[/prefix] or an absolute local folder")
    i.add_argument("--version", default=None, help="the version to pin when the dataset states none")
    i.add_argument("-o", "--file", default=None, metavar="FILE",
                   help="write the config here (never replaces a file); default: print it")
    i.add_argument("--cache-dir", default=None, help="local download/cache folder "
                   "(default $NEUROFLOW_CACHE or ~/.cache/neuroflow)")
    i.set_defaults(func=cmd_init)

    maps = sub.add_parser("maps", help="consume published maps").add_subparsers(dest="maps_command", required=True)
    ml = maps.add_parser("list", help="table of published analyses under OUTPUT_URI")
    ml.add_argument("output_uri")
    ml.set_defaults(func=cmd_maps_list)
    ms = maps.add_parser("show", help="summary and artifacts of one manifest")
    ms.add_argument("manifest_uri")
    ms.add_argument("--json", action="store_true")
    ms.set_defaults(func=cmd_maps_show)
    mg = maps.add_parser("get", help="download one artifact and verify its sha256")
    mg.add_argument("manifest_uri")
    mg.add_argument("artifact", help="artifact path as listed in the manifest")
    mg.add_argument("dest", nargs="?", help="file to write (default: the artifact's name, in this folder)")
    mg.add_argument("--overwrite", action="store_true", help="replace DEST if it exists (default: refuse)")
    mg.set_defaults(func=cmd_maps_get)

    d = sub.add_parser("demo-data", help="build the bundled demo dataset (real Alice data + a simulated subject)")
    d.add_argument("dest")
    d.add_argument("--model", required=True, help="language model folder used to simulate responses")
    d.add_argument("--resolution", type=float, default=8.0, help="voxel size (mm) of the simulated subject")
    d.set_defaults(func=cmd_demo_data)
    add_model_commands(sub)  # predict, insilico contrast|select (pipelines/models/commands.py)
    return p


def _private_matplotlib_cache(cache_dir: str | None) -> None:
    """matplotlib's font cache goes under neuroflow's cache, never into the user's ~/.cache or ~/.matplotlib."""
    if "MPLCONFIGDIR" not in os.environ:
        from .cache import default_cache_dir

        os.environ["MPLCONFIGDIR"] = str(Path(cache_dir or default_cache_dir()).expanduser() / "matplotlib")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # no library progress bars in logs and pipes
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    _private_matplotlib_cache(getattr(args, "cache_dir", None))
    try:
        return args.func(args)
    except NeuroflowError as err:
        print(f"neuroflow: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("neuroflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
