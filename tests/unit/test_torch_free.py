"""Modules the deploy side, the router and clients import must not pull in torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

TORCH_FREE = [
    "llava_sessions.cli",
    "llava_sessions.wire",
    "llava_sessions.serving_stack",
    "llava_sessions.session_routes",
    "llava_sessions.affinity_router",
    "llava_sessions.archive",
    "llava_sessions.handler.protocol",
    "llava_sessions.handler.dialects",
    "llava_sessions.handler.requests",
    "llava_sessions.handler.streaming",
    "llava_sessions.handler.image_sources",
    "llava_sessions.handler.engine.session_store",
    "llava_sessions.handler.engine.memory_budget",
    "llava_sessions.handler.engine.host_allocator",
    "llava_sessions.deploy",
    "llava_sessions.http_proxy_server",
    "llava_sessions.deploy.artifacts",
    "llava_sessions.deploy.endpoint",
    "llava_sessions.deploy.progress",
    "llava_sessions.deploy.image",
    "llava_sessions.deploy.client",
    "llava_sessions.commands.chat",
    "llava_sessions.deploy.eventstream",
    "llava_sessions.deploy.local_runtime",
    "llava_sessions.loadtest",
    "llava_sessions.bench.served",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_no_torch(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_wire_imports_only_the_standard_library():
    """The session contract (llava_sessions/wire.py) is importable anywhere: no package of ours or
    anyone else's comes with it."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import llava_sessions.wire\n"
        "ours = {'llava_sessions', 'llava_sessions.wire'}\n"
        "extra = sorted(m for m in set(sys.modules) - before\n"
        "               if m not in ours and m.split('.')[0] not in sys.stdlib_module_names)\n"
        "assert not extra, extra\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
