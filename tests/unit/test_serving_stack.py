"""What the serving stack hands its workers, and how it reports a component that stopped."""

from __future__ import annotations

import os

from llava_sessions.handler import router_hop
from llava_sessions.serving_stack import CPU_THREADS_ENV, ServingStack, cpu_threads_per_worker


def test_workers_get_the_routers_secret_and_their_share_of_the_cores(tmp_path, monkeypatch):
    monkeypatch.delenv(CPU_THREADS_ENV, raising=False)
    cores = len(os.sched_getaffinity(0))
    stack = ServingStack(tmp_path / "archive", tmp_path / "run", workers=2, port=0)
    env = stack.torchserve.extra_env
    assert env[router_hop.SECRET_ENV] == stack.secret and len(stack.secret) >= 64
    assert env[CPU_THREADS_ENV] == str(max(1, cores // 2))
    # `local`: every instance's workers share the host.
    shared = ServingStack(tmp_path / "archive", tmp_path / "run2", workers=1, port=0, host_workers=4 * cores)
    assert shared.torchserve.extra_env[CPU_THREADS_ENV] == "1"
    assert shared.secret != stack.secret  # one per start


def test_a_thread_count_set_by_the_user_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv(CPU_THREADS_ENV, "3")
    stack = ServingStack(tmp_path / "archive", tmp_path / "run", workers=2, port=0)
    assert CPU_THREADS_ENV not in stack.torchserve.extra_env  # the workers read the user's value


def test_cpu_threads_split_the_cores_and_never_reach_zero():
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads_per_worker(1) == cores
    assert cpu_threads_per_worker(cores * 8) == 1


def test_watch_says_when_the_router_stopped(tmp_path):
    class Running:  # TorchServe still up, nothing to report
        def wait(self, timeout=None):
            return None

        def poll_worker_changes(self):
            return []

    class Stopped:
        running = False
        failure = OSError("address in use")

    stack = ServingStack(tmp_path / "archive", tmp_path / "run", workers=1, port=0)
    stack.torchserve, stack.router = Running(), Stopped()
    assert "router stopped" in stack.watch(lambda event: None, interval=0.01)
    assert "address in use" in stack.watch(lambda event: None, interval=0.01)
