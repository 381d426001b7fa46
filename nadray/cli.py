"""The ``nadray`` command line (DESIGN.md "Command line").

Each subcommand parses its arguments, loads the config and calls one function of
the stage module it names; stage modules are imported only when their command
runs. User errors (``NadrayError``) print as one line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from nadray.errors import NadrayError

INGEST_FORMATS = ["auto", "zeek", "argus", "cicflowmeter", "unsw-nb15", "cs448b", "pcap"]


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (local or s3://)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value read as YAML (repeatable)")


def _config(args: argparse.Namespace):
    from nadray.config import load_config

    return load_config(args.config, args.overrides)


def cmd_ingest(args: argparse.Namespace) -> int:
    from nadray.ingest import ingest

    report = ingest(args.inputs, args.archive, fmt=args.format, quarantine=args.quarantine)
    print(report.summary())
    for message in report.failed_inputs:
        print(f"nadray ingest: error: {message}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from nadray.train import train

    result = train(args.archive, args.registry, _config(args))
    print(result.summary())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from nadray.tune import tune

    overrides = list(args.overrides)
    if args.search:
        overrides.append(f"tune.search={args.search}")
    if args.num_samples is not None:
        overrides.append(f"tune.num_samples={args.num_samples}")
    if args.time_budget_s is not None:
        overrides.append(f"tune.time_budget_s={args.time_budget_s}")
    args.overrides = overrides
    result = tune(args.archive, args.registry, _config(args))
    print(result.summary())
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nadray.evaluate import evaluate, summary_text

    metrics = evaluate(args.archive, args.model, args.report, _config(args) if (args.config or args.overrides) else None)
    print(summary_text(metrics))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from nadray.score import score

    report = score(args.model, args.input, args.output, fmt=args.format, start=args.start, end=args.end,
                   context_days=args.context_days)
    print(report.summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from nadray.serve import run_serve

    run_serve(args.model, host=args.host, port=args.port, replicas=args.replicas, cfg=_config(args))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from nadray.retrain import retrain

    report = retrain(args.landing, args.archive, args.registry, date=args.date, cfg=_config(args))
    print(report.summary())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nadray", description="Network anomaly detection on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="read raw traffic into the Parquet archive")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders (local or s3://)")
    p.add_argument("--archive", required=True, help="archive URI (local folder or s3://bucket/prefix)")
    p.add_argument("--format", default="auto", choices=INGEST_FORMATS)
    p.add_argument("--quarantine", help="where bad rows go (default: <archive>/_quarantine)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="fit the LSTM with Ray Train and register a version")
    p.add_argument("--archive", required=True)
    p.add_argument("--registry", required=True)
    _add_config(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="Ray Tune search over the same training loop")
    p.add_argument("--archive", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--search", choices=["grid", "random"])
    p.add_argument("--num-samples", type=int)
    p.add_argument("--time-budget-s", type=float)
    _add_config(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("evaluate", help="metrics.json, plots and report.html for a model")
    p.add_argument("--archive", required=True)
    p.add_argument("--model", required=True, metavar="REF", help="REGISTRY_URI[@champion|@VERSION]")
    p.add_argument("--report", required=True, metavar="DIR")
    _add_config(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("score", help="batch scoring: Parquet scores per flow (Ray Data actors for large inputs)")
    p.add_argument("--model", required=True, metavar="REF")
    p.add_argument("--input", required=True, nargs="+", metavar="PATH_OR_URI")
    p.add_argument("--output", required=True, metavar="URI")
    p.add_argument("--format", default="auto", choices=INGEST_FORMATS + ["archive"])
    p.add_argument("--start", metavar="DATE", help="archive only: flows from this date or ISO time (UTC) on; "
                   "each host's context starts here")
    p.add_argument("--end", metavar="DATE", help="archive only: flows before this date or ISO time (UTC)")
    p.add_argument("--context-days", type=float, default=1.0, metavar="DAYS",
                   help="with --start: days before it read as the hosts' context, not scored (default 1)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("serve", help="run the Ray Serve scoring endpoint in the foreground")
    p.add_argument("--model", required=True, metavar="REF")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    _add_config(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("retrain", help="the nightly pipeline: ingest, retrain, evaluate, promote, report")
    p.add_argument("--landing", required=True)
    p.add_argument("--archive", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--date", help="the night's date, YYYY-MM-DD (default: today, UTC)")
    _add_config(p)
    p.set_defaults(func=cmd_retrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    from nadray.runtime import configure_logging

    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except NadrayError as e:
        print(f"nadray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nadray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
