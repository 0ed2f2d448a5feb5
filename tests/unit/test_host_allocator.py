"""The worker keeps freed host memory: blocks freed and asked for again cost no page faults.

Each case runs in a fresh interpreter: the malloc policy is process-wide.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc policy"
)

# Four 8 MiB blocks written and freed, five times over (after one untimed round): the shape of a
# session closed and another opened. Prints whether the policy applied and the page faults taken.
PROBE = """
import ctypes, sys
from llava_sessions.handler.engine import host_allocator
applied = host_allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def minor_faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])
def cycle():
    blocks = [libc.malloc(8 << 20) for _ in range(4)]
    for block in blocks:
        ctypes.memset(block, 1, 8 << 20)
    for block in blocks:
        libc.free(block)
cycle()
before = minor_faults()
for _ in range(5):
    cycle()
print(applied, minor_faults() - before)
"""

PAGES_PER_ROUND = 4 * (8 << 20) // 4096


def run_probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env},
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_with_the_policy_freed_blocks_come_back_without_page_faults():
    applied, faults = run_probe("keep")
    assert applied
    assert faults < 50  # not one round's 8,192 pages


def test_without_it_glibc_gives_the_pages_back_and_faults_them_in_again():
    applied, faults = run_probe("default")
    assert not applied
    assert faults >= 4 * PAGES_PER_ROUND  # nearly every round faults all of its pages in


def test_a_malloc_setting_in_the_environment_is_left_alone():
    applied, faults = run_probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied
    assert faults >= 4 * PAGES_PER_ROUND
