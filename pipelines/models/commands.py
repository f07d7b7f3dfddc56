"""``neuroflow predict`` and ``neuroflow insilico contrast|select``: the command-line side of :mod:`pipelines.models`.

:func:`add_commands` adds the subcommands to the ``neuroflow`` parser (``pipelines.cli``); each
command prints the files it wrote, one per line, the output folder last.
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_commands"]


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("manifest_uri", metavar="MANIFEST", help="s3://.../manifest.json, or a local manifest path")
    sp.add_argument("--subject", default=None, help="whose models (needed when the analysis has several subjects)")
    sp.add_argument("--out", default=".", metavar="DIR", help="folder for the outputs (default: this folder)")
    sp.add_argument("--model-dir", default=None, metavar="DIR",
                    help="a local copy of the feature's transformers model (checked against the recorded files)")
    sp.add_argument("--words-per-second", type=float, default=None,
                    help="word rate of plain text (default: the training stories')")
    sp.add_argument("--cache-dir", default=None, help="download/cache folder (default $NEUROFLOW_CACHE or "
                    "~/.cache/neuroflow)")


def cmd_predict(args) -> int:
    from .predict import predict

    preds = predict(args.manifest_uri, text=args.text, textgrid=args.textgrid, audio=args.audio,
                    subject=args.subject, feature_spaces=args.feature_space or None, out=args.out,
                    n_samples=args.n_samples, start_time=args.start_time, like_story=args.like_story,
                    offset=args.offset, words_per_second=args.words_per_second, model_dir=args.model_dir,
                    zscore=args.zscore, cache_dir=args.cache_dir)
    out = Path(args.out)
    for p in preds:
        stem = f"sub-{p.model.subject}_desc-{''.join(c for c in p.model.feature_space if c.isalnum())}_pred"
        for path in sorted(out.glob(f"{stem}*")):
            print(path)
    print(out)
    return 0


def cmd_contrast(args) -> int:
    from .insilico import contrast

    result = contrast(args.manifest_uri, args.a, args.b, subject=args.subject, feature_space=args.feature_space,
                      out=args.out, words_per_second=args.words_per_second, model_dir=args.model_dir,
                      cache_dir=args.cache_dir)
    for path in result.files:
        print(path)
    print(args.out)
    return 0


def cmd_select(args) -> int:
    from .insilico import select_sentences

    targets = [t for t in args.targets.split(",") if t] if args.targets else None
    result = select_sentences(args.manifest_uri, args.candidates, n=args.n, targets=targets, mask=args.roi_mask,
                              top=args.top, subject=args.subject, feature_space=args.feature_space, out=args.out,
                              words_per_second=args.words_per_second, model_dir=args.model_dir,
                              cache_dir=args.cache_dir)
    for label, sentences in (("drive", result.drive), ("suppress", result.suppress)):
        for s in sentences:
            print(f"{label}\t{s}")
    for path in result.files:
        print(path)
    print(args.out)
    return 0


def add_commands(sub) -> None:
    """Add ``predict`` and ``insilico`` to the ``neuroflow`` subparsers ``sub``."""
    p = sub.add_parser("predict", help="predicted responses to a new stimulus from a published model")
    _common(p)
    stim = p.add_argument_group("the stimulus (at least one)")
    stim.add_argument("--text", default=None, metavar="FILE", help="plain text: words on an even clock")
    stim.add_argument("--textgrid", default=None, metavar="FILE", help="a Praat TextGrid of word timings")
    stim.add_argument("--audio", default=None, metavar="FILE", help="a WAV file (speech and acoustic features)")
    p.add_argument("--feature-space", action="append", default=[], metavar="NAME",
                   help="a feature space to predict from (repeatable; default: every one)")
    p.add_argument("--n-samples", type=int, default=None, help="samples to predict (default: to the end of the "
                   "stimulus plus the longest delay)")
    p.add_argument("--start-time", type=float, default=None, help="time of the first sample (s; default: the "
                   "training runs')")
    p.add_argument("--like-story", default=None, metavar="STORY",
                   help="sample as the recorded run of this story did (reproduces its held-out scores)")
    p.add_argument("--offset", type=float, default=None, help="seconds added to TextGrid / WAV times "
                   "(default: the config's word_timings.offset)")
    p.add_argument("--zscore", choices=("own", "training"), default="own",
                   help="standardise the features on the stimulus itself (as the fit did) or with the training "
                        "runs' statistics")
    p.set_defaults(func=cmd_predict)

    ins = sub.add_parser("insilico", help="in-silico experiments on a published model").add_subparsers(
        dest="insilico_command", required=True)
    c = ins.add_parser("contrast", help="predicted response to sentences A minus sentences B, as a map")
    _common(c)
    c.add_argument("--a", required=True, metavar="FILE", help="sentences A, one per line")
    c.add_argument("--b", required=True, metavar="FILE", help="sentences B, one per line")
    c.add_argument("--feature-space", default=None, metavar="NAME", help="which model (when there are several)")
    c.set_defaults(func=cmd_contrast)
    s = ins.add_parser("select", help="the candidate sentences predicted to drive or suppress a target set")
    _common(s)
    s.add_argument("--candidates", required=True, metavar="FILE", help="candidate sentences, one per line")
    s.add_argument("-n", type=int, default=5, help="sentences to choose each way (default 5)")
    s.add_argument("--targets", default=None, metavar="NAMES", help="the target set by name, comma-separated")
    s.add_argument("--roi-mask", default=None, metavar="FILE", help="the target set as a NIfTI mask on the "
                   "model's grid")
    s.add_argument("--top", type=int, default=None, help="the target set as the N best-predicted targets "
                   "(published held-out r; the default, with N = 10)")
    s.add_argument("--feature-space", default=None, metavar="NAME", help="which model (when there are several)")
    s.set_defaults(func=cmd_select)
