"""``llava-sessions local``: a local stand-in for a SageMaker endpoint (deploy/local_runtime.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from llava_sessions.commands import model_arguments, serving_archive, stop_on_sigterm
from llava_sessions.deploy.local_runtime import (
    DEFAULT_INSTANCES,
    DEFAULT_PORT,
    INVOCATION_TIMEOUT_S,
    LOOPBACK,
    LocalRuntime,
    boto3_snippet,
    is_valid_endpoint_name,
)

def register(commands) -> None:
    local = commands.add_parser(
        "local",
        help="a local stand-in for a SageMaker endpoint: N instances behind the sagemaker-runtime API",
        description="Start N independent instances of the serving stack (each its own TorchServe) and, in front "
        "of them, a development stand-in for the Amazon SageMaker runtime API with sticky session routing, so "
        "unmodified boto3 works against it with endpoint_url=. It is not AWS: no authentication, no CloudWatch.",
    )
    model_arguments(local)
    local.add_argument("--archive", type=Path, metavar="DIR",
                       help="serve a prebuilt archive folder instead of building one from --model")
    local.add_argument("--instances", type=int, default=DEFAULT_INSTANCES,
                       help=f"instances, each a full serving stack with its own model copy (default {DEFAULT_INSTANCES})")
    local.add_argument("--workers", type=int, default=1, help="model copies (workers) per instance (default 1)")
    local.add_argument("--host", default=LOOPBACK, help="bind address of the runtime API (default 127.0.0.1)")
    local.add_argument("--port", type=int, default=DEFAULT_PORT)
    local.add_argument("--endpoint-name", help="answer only this endpoint name (default: any name)")
    local.add_argument("--invocation-timeout", type=float, default=INVOCATION_TIMEOUT_S,
                       help="seconds a non-streamed invocation may take, SageMaker's 60 by default")
    local.add_argument("--run-dir", type=Path, help="logs and TorchServe state (default: under the cache)")
    local.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for READY workers")
    local.set_defaults(run=cmd_local)


def cmd_local(args) -> int:
    from llava_sessions import models
    from llava_sessions.errors import ConfigError
    from llava_sessions.torchserve_process import TorchServeError

    if args.instances < 1 or args.workers < 1:
        raise ConfigError("--instances and --workers must be positive")
    if args.endpoint_name is not None and not is_valid_endpoint_name(args.endpoint_name):
        raise ConfigError(f"--endpoint-name {args.endpoint_name!r} is not a valid SageMaker endpoint name")
    archive = serving_archive(args)
    run_dir = args.run_dir or models.home() / "run" / f"local-{args.port}"
    served = args.archive or args.model or "the offline tiny model (random weights)"
    print(f"llava-sessions local: a development stand-in for the Amazon SageMaker runtime, not AWS "
          f"(no authentication). Starting {args.instances} instance(s) of {served}; logs in {run_dir}",
          flush=True)
    if args.host not in (LOOPBACK, "localhost", "::1"):
        print(f"llava-sessions local: warning: listening on {args.host} without any authentication", flush=True)
    runtime = LocalRuntime(archive, run_dir, instances=args.instances, workers=args.workers, host=args.host,
                           port=args.port, endpoint_name=args.endpoint_name,
                           invocation_timeout_s=args.invocation_timeout)
    stop_on_sigterm()
    try:
        runtime.start(ready_timeout=args.ready_timeout)
        name = args.endpoint_name or "any name"
        print(f"llava-sessions local: endpoint URL {runtime.url} (endpoint: {name}; {args.instances} instance(s) "
              f"READY). Ctrl-C stops. From Python: {boto3_snippet(runtime.url)}", flush=True)
        metrics = ", ".join(stack.torchserve.metrics_url for stack in runtime.stacks)
        print(f"llava-sessions local: Prometheus metrics of each instance: {metrics}", flush=True)
        reported: set[int] = set()
        while True:
            alive = runtime.alive()
            for index, up in enumerate(alive):
                if not up and index not in reported:
                    reported.add(index)
                    print(f"llava-sessions local: instance {index} exited; its sessions are lost "
                          f"(logs in {runtime.stacks[index].log_dir})", file=sys.stderr, flush=True)
            if not any(alive):
                print("llava-sessions local: every instance exited", file=sys.stderr)
                return 1
            time.sleep(1.0)
    except TorchServeError as exc:
        print(f"llava-sessions local: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llava-sessions local: stopping", flush=True)
        return 0
    finally:
        runtime.stop()

