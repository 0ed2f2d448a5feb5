"""How the layers may depend on each other: the CLI is the top one, imported by nothing."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY = ["llava_sessions", "handler", "deploy"]
CLI = {REPO / "llava_sessions" / "cli.py", REPO / "llava_sessions" / "commands"}
IMPORTS_THE_CLI = re.compile(r"llava_sessions\.(cli|commands)\b|from llava_sessions import [^\n]*\b(cli|commands)\b")


def library_modules() -> list[Path]:
    found = []
    for folder in LIBRARY:
        for path in (REPO / folder).rglob("*.py"):
            if path in CLI or any(parent in CLI for parent in path.parents):
                continue
            found.append(path)
    return found


def test_no_library_module_imports_the_cli():
    offenders = [str(p.relative_to(REPO)) for p in library_modules() if IMPORTS_THE_CLI.search(p.read_text())]
    assert offenders == []


def test_the_offline_checkpoint_builder_is_not_part_of_the_engine():
    assert not (REPO / "handler" / "engine" / "tiny_model.py").exists()
    engine = "\n".join(p.read_text() for p in (REPO / "handler" / "engine").glob("*.py"))
    assert "tiny_model" not in engine
