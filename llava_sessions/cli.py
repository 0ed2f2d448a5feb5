"""The ``llava-sessions`` command: the top layer. It parses arguments and runs a command from
``llava_sessions.commands``; nothing imports it."""

from __future__ import annotations

import argparse
import sys

from llava_sessions import __version__
from llava_sessions.commands import bench, chat, endpoint, image, loadtest, local, model, serve, show_defaults, upload
from llava_sessions.errors import ConfigError

# In the order `--help` lists them.
COMMANDS = (model, serve, bench, upload, endpoint, image, chat, local, loadtest)


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    show_defaults(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main())
