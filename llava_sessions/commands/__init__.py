"""The ``llava-sessions`` commands: argument parsing on top of the libraries. Only ``cli`` imports them.

One module a command group; each has ``register(commands)``, which adds its subparsers and sets
``run``. Heavy imports (torch, boto3) stay inside the ``cmd_*`` functions so ``--help`` is fast.
This module holds what several commands share.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import signal
import subprocess
from pathlib import Path

from llava_sessions.config import ENV_PREFIX, RouterConfig, ServingConfig
from llava_sessions.errors import ConfigError


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help shows its default, unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` and every subcommand under it the HelpFormatter."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and the settings baked into a built archive."""
    parser.add_argument(
        "--model",
        help="local LLaVA checkpoint directory or hub id (default: the offline tiny model, random weights)",
    )
    parser.add_argument("--max-sessions-per-worker", "--sessions-per-worker", type=int,
                        dest="max_sessions_per_worker", default=ServingConfig.max_sessions_per_worker,
                        help="sessions one worker holds; more get 429 (--sessions-per-worker is the old name)")
    parser.add_argument("--session-ttl", type=int, default=ServingConfig.session_ttl_s,
                        help="session life in seconds, from the open")


def aws_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)")
    parser.add_argument("--profile", help="AWS profile (default: AWS_PROFILE)")


def router_arguments(parser: argparse.ArgumentParser) -> None:
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


def router_config(args) -> RouterConfig:
    names = [f.name for f in dataclasses.fields(RouterConfig)]
    return RouterConfig.from_sources(**{name: getattr(args, name, None) for name in names})


def archive_from_args(args, model_dir: Path, out_dir: Path, fmt: str) -> Path:
    """Build the archive for --model with the settings of model_arguments()."""
    from llava_sessions.archive import build_archive

    if args.max_sessions_per_worker <= 0 or args.session_ttl <= 0:
        raise ConfigError("--max-sessions-per-worker and --session-ttl must be positive")
    return build_archive(
        model_dir,
        out_dir,
        max_sessions_per_worker=args.max_sessions_per_worker,
        session_ttl_s=args.session_ttl,
        fmt=fmt,
    )


def prebuilt_archive(args) -> Path:
    """--archive: a no-archive model folder (what `upload` puts on S3, SageMaker's /opt/ml/model)."""
    from llava_sessions.archive import check_archive_folder

    if args.model:
        raise ConfigError("give --model (build an archive) or --archive (serve a built one), not both")
    if (args.max_sessions_per_worker, args.session_ttl) != (ServingConfig.max_sessions_per_worker,
                                                          ServingConfig.session_ttl_s):
        raise ConfigError(
            "--max-sessions-per-worker and --session-ttl are baked into a built archive; with --archive set "
            "LLAVA_SESSIONS_MAX_SESSIONS_PER_WORKER / LLAVA_SESSIONS_SESSION_TTL_S instead"
        )
    return check_archive_folder(args.archive, "--archive")


def serving_archive(args) -> Path:
    """What `serve` and `local` serve: --archive as given (checked), else the archive built from
    --model (the offline tiny model by default), next to the checkpoint."""
    if args.archive is not None:
        return prebuilt_archive(args)
    from llava_sessions import models

    model_dir = models.resolve_model(args.model)
    return archive_from_args(args, model_dir, models.archive_dir_for(model_dir), "no-archive")


def workers(args) -> int:
    if args.workers is not None and args.workers <= 0:
        raise ConfigError("--workers must be positive")
    return args.workers or gpu_count() or 1


def gpu_count() -> int:
    """GPUs visible to nvidia-smi; 0 without one (TorchServe then runs workers on the CPU)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def stop_on_sigterm() -> None:
    """SIGTERM (docker stop, systemd) stops as cleanly as Ctrl-C."""

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)
