"""The `remamber` command: one subcommand per pipeline step; the Snakemake rules call these.

This module only wires: it parses options and calls one function of a layer (imported lazily, so that
`remamber --help` stays fast and a data step never imports the model code).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from remamber import __version__
from remamber.errors import RemamberError

DEBUG_ENV = "REMAMBER_DEBUG"


class CLIError(RemamberError):
    """A user-facing error of the command line itself: printed as one line, exit status 2."""


def _user_message(exc: BaseException) -> str:
    """The message of `exc`; for an error raised in a DataLoader worker, torch re-raises it with the worker's
    traceback folded into the message: keep only the original message (--debug shows the rest)."""
    text = str(exc)
    if "\nOriginal Traceback (most recent call last):\n" in text:
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        at = text.rfind("\n" + prefix)
        if at >= 0:
            return text[at + 1 + len(prefix):].rstrip() + " (in a data-loading worker)"
    return text


def _int_at_least(minimum: int, kind: str, bound: str):
    """An argparse type: an integer >= minimum, with a one-line message naming the bound."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1, "positive", "at least 1")
_non_negative_int = _int_at_least(0, "non-negative", "0 or more")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _split_name(text: str) -> str:
    from remamber.data.preprocess import check_split_name

    try:
        return check_split_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit_cpu_threads(n: int) -> None:
    """Give torch and the numba scan kernel `n` threads each (they run one after the other, never together).

    Parallel Snakemake jobs each get their share of the cores this way: two OpenMP pools per job, each as
    wide as the machine, made steps 10-30x slower through oversubscription on 2 cores.
    """
    import numba
    import torch

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _key_value_paths(pairs: list[str], what: str) -> dict[str, Path]:
    """Parse `label=path` arguments (figure inputs) keeping their order."""
    out: dict[str, Path] = {}
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or not label or not path:
            raise CLIError(f"{what}: expected LABEL=PATH, got {pair!r}")
        out[label] = Path(path)
    return out


# --- data ---------------------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> None:
    from remamber.data.manifest import write_manifest
    from remamber.data.synth import SIZES, write_synthetic

    if args.size not in SIZES:
        raise CLIError(f"--size: unknown synthetic size {args.size!r}; choose one of {', '.join(SIZES)}")
    write_synthetic(args.out, seed=args.seed, size=args.size)
    write_manifest(args.out)


def cmd_fetch(args: argparse.Namespace) -> None:
    from remamber.data.fetch import fetch

    fetch(args.names, args.dest, datasets_yaml=args.datasets_yaml, retries=args.retries, timeout=args.timeout)


def cmd_extract(args: argparse.Namespace) -> None:
    from remamber.data.fetch import extract

    extract(args.archive, args.dest)


def cmd_preprocess(args: argparse.Namespace) -> None:
    from remamber.data.preprocess import preprocess

    preprocess(
        args.data_root,
        args.dataset,
        args.out,
        split_by=args.split_by,
        mask_mode=args.mask_mode,
        text_field=args.text_field,
        expected_counts=args.expected_counts,
    )


# --- engine -------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> None:
    from remamber.config import ExperimentConfig
    from remamber.engine.jobs import check_model_section
    from remamber.engine.train import train

    cfg = ExperimentConfig.from_yaml(args.config)
    check_model_section(cfg)
    train(
        cfg,
        args.dataset,
        args.variant,
        args.resolution,
        args.out,
        resume=args.resume,
        experiment=args.experiment,
        tables=args.tables.split(",") if args.tables else None,
        device=args.device,
        overwrite=args.overwrite,
        tracking_uri=args.tracking_uri,
    )


def cmd_evaluate(args: argparse.Namespace) -> None:
    """One split: OUT is that split's record. Several: OUT is the list of their records, written once all
    are scored (one process per model, which is built once: that saves the start-up of one per split)."""
    import tempfile

    from remamber.fileio import atomic_write_json
    from remamber.engine.evaluate import evaluate_splits

    def run(outs: dict[str, Path]) -> list[dict]:
        return evaluate_splits(
            args.checkpoint,
            outs,
            index_dir=args.index_dir,
            data_root=args.data_root,
            protocol=args.protocol,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            tracking=not args.no_tracking,
            tracking_uri=args.tracking_uri,
            text=args.text,
        )

    if len(args.split) == 1:
        print(json.dumps(run({args.split[0]: args.out})[0], indent=1, sort_keys=True))
        return
    if len(set(args.split)) != len(args.split):
        raise CLIError(f"--split lists a split twice: {args.split}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out.parent, prefix=f".{args.out.name}.") as tmp:
        records = run({split: Path(tmp) / f"{split}.json" for split in args.split})
    atomic_write_json(args.out, records)
    for r in records:
        print(f"{r['split']:6s} mIoU {r['mIoU']:5.1f}  oIoU {r['oIoU']:5.1f}  prec@50 {r['prec@50']:5.1f}  ({r['text']} text)")


def cmd_baseline(args: argparse.Namespace) -> None:
    from remamber.fileio import atomic_write_json
    from remamber.engine.baselines import evaluate_baselines

    records = []
    for split in args.split:
        for kind, record in evaluate_baselines(args.index_dir, split, args.data_root, tuple(args.kinds),
                                               seed=args.seed).items():
            records.append(record)
            print(f"{split:6s} {kind:15s} mIoU {record['mIoU']:5.1f}  oIoU {record['oIoU']:5.1f}  "
                  f"prec@50 {record['prec@50']:5.1f}")
    atomic_write_json(args.out, records)


def cmd_predict(args: argparse.Namespace) -> None:
    from remamber.engine.predict import predict

    predict(args.checkpoint, args.image, args.text, args.out, mask_out=args.mask_out)


def cmd_inspect(args: argparse.Namespace) -> None:
    from remamber.engine.inspect import dump_inspection

    dump_inspection(
        args.checkpoint,
        args.split,
        args.out,
        index_dir=args.index_dir,
        data_root=args.data_root,
        n_samples=args.n_samples,
    )


def cmd_plan(args: argparse.Namespace) -> None:
    from remamber.config import ExperimentConfig

    from remamber.engine.jobs import check_model_section

    cfg = ExperimentConfig.from_yaml(args.config)
    check_model_section(cfg)
    jobs = cfg.jobs()
    for job in jobs:
        print(f"train {job.dataset:9s} {job.variant:16s} {job.resolution:4d}  tables={','.join(job.tables)}")
    print(f"{len(jobs)} trainings, {len(cfg.evaluations())} evaluations")


# --- reports ------------------------------------------------------------------------------------------


def _load_records(paths: list[Path]) -> list[dict]:
    from remamber.formats import read_metrics_records

    return read_metrics_records(paths)


def cmd_report(args: argparse.Namespace) -> None:
    from remamber.config import ExperimentConfig
    from remamber.reports.tables import write_table

    cfg = ExperimentConfig.from_yaml(args.config)
    tables = cfg.table_specs()
    names = [args.table] if args.table else list(tables)
    for name in names:
        if name not in tables:
            raise CLIError(f"{args.config}: no table {name!r}; known: {', '.join(tables)}")
        records = _load_records(sorted(Path(args.metrics_root).rglob("*.json")))
        write_table(name, tables[name], records, args.out)


def cmd_summarize(args: argparse.Namespace) -> None:
    from remamber.reports.tables import write_metrics_summary

    write_metrics_summary(_load_records(args.metrics), args.out)


def cmd_figure(args: argparse.Namespace) -> None:
    from remamber.reports import figures

    if args.kind == "interaction":
        figures.fig_interaction_vs_attention(args.twister, args.attention, args.out)
    elif args.kind == "pca":
        figures.fig_cube_pca(args.twister, args.out)
    elif args.kind == "overlays":
        figures.fig_overlays(_key_value_paths(args.inputs, "figure overlays"), args.out)
    elif args.kind == "curves":
        figures.fig_training_curves(_key_value_paths(args.inputs, "figure curves"), args.out)


# --- parser -------------------------------------------------------------------------------------------


def _subparser_class(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """Subcommand parsers that inherit the options of `common` (--debug after the subcommand)."""

    class SubParser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("parents", [common])
            super().__init__(*args, **kwargs)

    return SubParser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="remamber", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"remamber {__version__}")
    parser.add_argument(
        "--threads", type=_positive_int, default=None,
        help="CPU threads for torch and the scan kernel (default: all)"
    )
    debug_help = f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # also accepted after the subcommand; SUPPRESS keeps a subcommand from resetting the global flag
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_subparser_class(common))

    p = sub.add_parser("synth", help="write the synthetic referring datasets in the refer format")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="demo")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("fetch", help="download and verify archives listed in params/datasets.yaml")
    p.add_argument("names", nargs="+", help="archive names, e.g. refcoco.zip train2014.zip")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--datasets-yaml", type=Path, default=Path("params/datasets.yaml"))
    p.add_argument("--retries", type=_non_negative_int, default=4,
                   help="failed attempts without progress allowed per mirror before the next one (default: 4); "
                        "an attempt that brings new bytes does not count")
    p.add_argument("--timeout", type=_positive_float, default=60.0,
                   help="seconds without an answer or data before an attempt fails (default: 60)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser(
        "extract", help="extract a verified archive (refusing entries outside --dest); DEST/.NAME.extracted last"
    )
    p.add_argument("archive", type=Path)
    p.add_argument("--dest", type=Path, required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("preprocess", help="refer files -> one parquet index per split")
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split-by", default=None)
    p.add_argument("--mask-mode", default="union", choices=["union", "refer_eq1"])
    p.add_argument("--text-field", default="raw", choices=["raw", "sent"],
                   help="refer sentence field used as text: raw, or sent (lower-cased, no punctuation; the authors')")
    p.add_argument(
        "--expected-counts",
        type=Path,
        default=None,
        help="params/datasets.yaml for real data (default: the synthetic generator's synth_meta.json)",
    )
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser("train", help="train one model of the experiment matrix")
    p.add_argument("--config", type=Path, required=True, help="params file, e.g. params/demo.yaml")
    p.add_argument("--dataset", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--experiment", default=None, help="MLflow experiment (default: first table using it)")
    p.add_argument("--tables", default=None, help="comma-separated tables this model serves")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt when it exists")
    p.add_argument("--overwrite", action="store_true",
                   help="train from scratch even if OUT already holds a training (it is replaced)")
    p.add_argument("--device", default=None, help="cpu, cuda (this process's GPU) or cuda:N (default: auto)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: the params file's tracking.uri, else MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a checkpoint on every sentence of one or more splits")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--split", type=_split_name, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True,
                   help="metrics JSON: the split's record, or the list of records of several splits")
    p.add_argument("--index-dir", type=Path, default=None)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--protocol", choices=["original", "input"], default=None)
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--num-workers", type=_non_negative_int, default=None)
    p.add_argument("--no-tracking", action="store_true")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db; never the checkpoint's)")
    p.add_argument("--text", choices=["matched", "shuffled"], default="matched",
                   help="shuffled: the control where every sample gets the sentence of another image")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("baseline", help="score the text-blind baselines (largest / centre / random object)")
    p.add_argument("--index-dir", type=Path, required=True)
    p.add_argument("--split", type=_split_name, nargs="+", required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="metrics JSON: the list of records, split x baseline")
    p.add_argument("--kinds", nargs="+", default=["largest_object", "centre_object", "random_object"],
                   choices=["largest_object", "centre_object", "random_object"])
    p.add_argument("--seed", type=int, default=0, help="seed of the random-object draw")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("predict", help="segment the object an expression refers to in one image")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--out", type=Path, required=True, help="overlay PNG")
    p.add_argument("--mask-out", type=Path, default=None, help="binary mask PNG")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("inspect", help="dump interaction/attention maps and cube features for the figures")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--split", type=_split_name, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--index-dir", type=Path, default=None)
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--n-samples", type=_positive_int, default=4)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("plan", help="print the training jobs and evaluations of a params file")
    p.add_argument("--config", type=Path, required=True)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("report", help="render Tables 1-4 (.tex and .csv) from evaluation outputs")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--table", default=None, help="one table (default: all)")
    p.add_argument("--metrics-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("summarize", help="collect metrics JSON files into one reports/metrics.json")
    p.add_argument("metrics", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("figure", help="render one of the paper's figures from inspection/history files")
    p.add_argument("kind", choices=["interaction", "pca", "overlays", "curves"])
    p.add_argument("inputs", nargs="*", help="LABEL=PATH pairs (overlays, curves)")
    p.add_argument("--twister", type=Path, default=None)
    p.add_argument("--attention", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True, help="output path without extension (.png and .pdf)")
    p.set_defaults(func=cmd_figure)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    # the layers report through logging (skipped polygons, truncated sentences, resumed downloads):
    # show them, one line each, in the rule's log
    logging.basicConfig(level=logging.WARNING, format="remamber: %(levelname)s: %(message)s")
    logging.getLogger("remamber").setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        if args.threads is not None:
            _limit_cpu_threads(args.threads)
        args.func(args)
    except (RemamberError, OSError) as exc:
        # the project's errors (and the environment's: missing files, permissions, full disk) carry a
        # message written for the user; a traceback would bury it. Anything else is a bug: traceback.
        if debug:
            traceback.print_exc()
        print(f"remamber: error: {_user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("remamber: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
