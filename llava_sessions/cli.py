"""The ``llava-sessions`` command. Heavy imports (torch) happen only in the subcommands that need them."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from llava_sessions.config import ENV_PREFIX, RouterConfig, ServingConfig
from llava_sessions.errors import ConfigError

DEFAULT_SESSIONS_PER_WORKER = 32

# Command groups that live beside their code (torch-free deploy side). Each
# module defines register(commands) adding its subparsers; imports of boto3
# and friends stay inside the commands so --help stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "llava_sessions.deploy.artifacts",
    "llava_sessions.deploy.endpoint",
    "llava_sessions.deploy.image",
    "llava_sessions.deploy.chat",
    "llava_sessions.deploy.local_runtime",
    "llava_sessions.loadtest",
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except ConfigError as exc:
        print(f"llava-sessions: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-sessions",
        description="Stateful multi-turn LLaVA on TorchServe and SageMaker sticky sessions.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    tiny = commands.add_parser("tiny-model", help="write the offline random-weight LLaVA checkpoint")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=cmd_tiny_model)

    archive = commands.add_parser("archive", help="build the TorchServe model archive")
    _model_arguments(archive)
    archive.add_argument("--out", type=Path, required=True, help="folder to write the archive into")
    archive.add_argument("--format", default="no-archive", choices=["no-archive", "default", "tgz"])
    archive.set_defaults(run=cmd_archive)

    serve = commands.add_parser("serve", help="run TorchServe in the foreground with the session handler")
    _model_arguments(serve)
    serve.add_argument("--archive", type=Path, metavar="DIR",
                       help="serve a prebuilt archive folder instead of building one from --model "
                       "(the container serves /opt/ml/model)")
    serve.add_argument("--workers", type=int, default=None, help="model copies, one worker each (default: one per GPU, else 1)")
    serve.add_argument("--host", default="127.0.0.1", help="inference bind address (0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--run-dir", type=Path, help="logs and TorchServe state (default: under the cache)")
    serve.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for READY workers")
    _router_arguments(serve)
    serve.set_defaults(run=cmd_serve)

    bench = commands.add_parser(
        "bench",
        help="time one multi-turn conversation: our stack over HTTP vs stateless, pixel-cache and floor",
        description="Time one conversation of K turns about one image through (a) our serving stack over "
        "HTTP, (b) a stateless model.generate, (c) the AWS sample's pixel cache and (d) the bare floor, "
        "on identical token histories. --preset llava-1.5-7b writes a ~14 GB float16 random-weight "
        "checkpoint to the cache once (for a GPU); --model DIR uses an existing checkpoint instead.",
    )
    bench.add_argument("--preset", default="small", choices=["tiny", "small", "llava-1.5-7b"],
                       help="random-weight model shape (default: small, the CPU default)")
    bench.add_argument("--model", help="existing checkpoint directory (overrides the preset's weights)")
    bench.add_argument("--turns", type=int, default=6, help="turns in the conversation, at least 2 (default 6)")
    bench.add_argument("--repeats", type=int, default=3, help="repeats per turn; medians are reported (default 3)")
    bench.add_argument("--max-new-tokens", type=int, default=24, help="answer length of the reference turns")
    bench.add_argument("--concurrency", type=int, default=8, help="sessions taking turns at once (default 8)")
    bench.add_argument("--device", default="auto", help="auto (cuda:0 if present, else cpu), cpu or cuda:N")
    bench.add_argument("--budget-gb", type=float, help="memory budget for the sessions-fit figure (default: free memory)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--plot", type=Path, metavar="FILE.png", help="draw TTFT per turn (needs matplotlib)")
    bench.add_argument("--workers-scaling", action="store_true",
                       help="instead: aggregate tokens/s of one worker, two workers sharing the cores, and two "
                       "workers each on every core (--concurrency sessions x --turns turns, --repeats rounds)")
    bench.set_defaults(run=cmd_bench)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(commands)
    return parser


def _router_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's limits (docs/limits.md); each defaults to $LLAVA_SESSIONS_<NAME>, else the built-in."""
    defaults = RouterConfig()
    options = [
        ("--max-request-bytes", int, "max_request_bytes", "largest request body; above it 413 REQUEST_TOO_LARGE"),
        ("--drain-seconds", float, "drain_seconds",
         "on SIGTERM, how long turns in flight get to finish before they are cut"),
        ("--idle-timeout", float, "idle_timeout_s", "seconds a connection may sit with no request in progress"),
        ("--header-timeout", float, "header_timeout_s", "seconds from a request's first byte to its whole headers"),
        ("--body-timeout", float, "body_timeout_s", "seconds from a request's headers to its whole body"),
        ("--max-connections", int, "max_connections", "open client connections; beyond it 503"),
    ]
    for flag, kind, name, text in options:
        parser.add_argument(flag, type=kind, dest=name, default=None,
                            help=f"{text} (default ${ENV_PREFIX}{name.upper()}, else {getattr(defaults, name):g})")


def _router_config(args) -> RouterConfig:
    names = [f.name for f in dataclasses.fields(RouterConfig)]
    return RouterConfig.from_sources(**{name: getattr(args, name, None) for name in names})


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        help="local LLaVA checkpoint directory or hub id (default: the offline tiny model, random weights)",
    )
    parser.add_argument("--sessions-per-worker", type=int, default=DEFAULT_SESSIONS_PER_WORKER)
    parser.add_argument("--session-ttl", type=int, default=ServingConfig.session_ttl_s, help="seconds")


# --- commands -----------------------------------------------------------------


def cmd_tiny_model(args) -> int:
    from llava_sessions.handler.engine.tiny_model import write_tiny_llava

    path = write_tiny_llava(args.dir, preset=args.preset, seed=args.seed)
    print(f"wrote a random-weight LLaVA ({args.preset}, seed {args.seed}) to {path}")
    return 0


def cmd_archive(args) -> int:
    from llava_sessions import models

    archive = _build_archive(args, models.resolve_model(args.model), args.out, args.format)
    print(f"archive: {archive}")
    return 0


def cmd_serve(args) -> int:
    from llava_sessions import models
    from llava_sessions.serving_stack import ServingStack
    from llava_sessions.torchserve_process import TorchServeError

    config = _router_config(args)
    workers = _workers(args)
    if args.archive is not None:
        archive = _prebuilt_archive(args)
    else:
        model_dir = models.resolve_model(args.model)
        archive = _build_archive(args, model_dir, models.archive_dir_for(model_dir), "no-archive")
    run_dir = args.run_dir or models.home() / "run" / f"serve-{args.port}"
    stack = ServingStack(archive, run_dir, workers=workers, host=args.host, port=args.port, config=config)
    _stop_on_sigterm()
    serving = False
    try:
        stack.start(ready_timeout=args.ready_timeout)
        serving = True
        served = args.archive or args.model or "the offline tiny model (random weights)"
        print(f"llava-sessions: serving {served} "
              f"with {workers} worker(s) at {stack.url}  (POST /invocations, GET /ping; "
              f"Prometheus metrics: {stack.torchserve.metrics_url}; logs in {stack.log_dir}); Ctrl-C stops", flush=True)
        stopped = stack.watch(lambda event: print(f"llava-sessions: {event}", file=sys.stderr, flush=True))
        print(f"llava-sessions: {stopped}", file=sys.stderr, flush=True)
        return 1
    except TorchServeError as exc:
        print(f"llava-sessions: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not serving:
            print("llava-sessions: stopping", flush=True)
            return 0
        print(f"llava-sessions: stopping: new requests get 503, turns in flight get up to "
              f"{config.drain_seconds:g} s", flush=True)
        report = stack.drain()
        print(f"llava-sessions: drained ({report.finished} finished, {report.cut} cut, "
              f"{report.refused} refused); stopping TorchServe", flush=True)
        return 0
    finally:
        stack.stop()


def cmd_bench(args) -> int:
    from llava_sessions import bench

    if args.workers_scaling:
        return bench.workers_main(args)
    return bench.main(args)


# --- helpers --------------------------------------------------------------------


def _build_archive(args, model_dir: Path, out_dir: Path, fmt: str) -> Path:
    from llava_sessions.archive import build_archive

    if args.sessions_per_worker <= 0 or args.session_ttl <= 0:
        raise ConfigError("--sessions-per-worker and --session-ttl must be positive")
    return build_archive(
        model_dir,
        out_dir,
        sessions_per_worker=args.sessions_per_worker,
        session_ttl_s=args.session_ttl,
        fmt=fmt,
    )


def _prebuilt_archive(args) -> Path:
    """--archive: a no-archive model folder (what `upload` puts on S3, SageMaker's /opt/ml/model)."""
    if args.model:
        raise ConfigError("give --model (build an archive) or --archive (serve a built one), not both")
    if (args.sessions_per_worker, args.session_ttl) != (DEFAULT_SESSIONS_PER_WORKER, ServingConfig.session_ttl_s):
        raise ConfigError(
            "--sessions-per-worker and --session-ttl are baked into a built archive; with --archive set "
            "LLAVA_SESSIONS_MAX_SESSIONS_PER_WORKER / LLAVA_SESSIONS_SESSION_TTL_S instead"
        )
    if not (args.archive / "MAR-INF" / "MANIFEST.json").is_file():
        raise ConfigError(
            f"--archive {args.archive} is not a TorchServe model archive folder (no MAR-INF/MANIFEST.json). "
            "Build one with `llava-sessions archive --model M --out DIR` and pass DIR/llava. In the "
            "container it is /opt/ml/model, where SageMaker copies what `llava-sessions upload` put on S3"
        )
    return args.archive.resolve()


def _workers(args) -> int:
    if args.workers is not None and args.workers <= 0:
        raise ConfigError("--workers must be positive")
    return args.workers or _gpu_count() or 1


def _gpu_count() -> int:
    """GPUs visible to nvidia-smi; 0 without one (TorchServe then runs workers on the CPU)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _stop_on_sigterm() -> None:
    """SIGTERM (docker stop, systemd) stops as cleanly as Ctrl-C."""

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


if __name__ == "__main__":
    sys.exit(main())
