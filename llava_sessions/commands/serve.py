"""``llava-sessions serve``: TorchServe and the affinity router in the foreground, drained on SIGTERM."""

from __future__ import annotations

import sys
from pathlib import Path

from llava_sessions.commands import (
    model_arguments,
    router_arguments,
    router_config,
    serving_archive,
    stop_on_sigterm,
    workers,
)


def register(commands) -> None:
    serve = commands.add_parser("serve", help="run TorchServe in the foreground with the session handler")
    model_arguments(serve)
    serve.add_argument("--archive", type=Path, metavar="DIR",
                       help="serve a prebuilt archive folder instead of building one from --model "
                       "(the container serves /opt/ml/model)")
    serve.add_argument("--workers", type=int, default=None, help="model copies, one worker each (default: one per GPU, else 1)")
    serve.add_argument("--host", default="127.0.0.1", help="inference bind address (0.0.0.0 in a container)")
    serve.add_argument("--port", type=int, default=8080, help="the router's port (0: a free one)")
    serve.add_argument("--run-dir", type=Path, help="logs and TorchServe state (default: under the cache)")
    serve.add_argument("--ready-timeout", type=float, default=900, help="seconds to wait for READY workers")
    serve.add_argument("--compile", choices=["auto", "on", "off"],
                       help="compile the workers' decode step (torch.compile; CUDA graphs on a GPU): auto is on "
                       "for a GPU, off for a CPU (default $LLAVA_SESSIONS_COMPILE, else auto)")
    router_arguments(serve)
    serve.set_defaults(run=cmd_serve)


def cmd_serve(args) -> int:
    from llava_sessions import models
    from llava_sessions.serving_stack import ServingStack
    from llava_sessions.torchserve_process import TorchServeError

    config = router_config(args)
    n_workers = workers(args)
    archive = serving_archive(args)
    run_dir = args.run_dir or models.home() / "run" / f"serve-{args.port}"
    worker_env = {} if args.compile is None else {"LLAVA_SESSIONS_COMPILE": args.compile}
    stack = ServingStack(archive, run_dir, workers=n_workers, host=args.host, port=args.port, config=config,
                         worker_env=worker_env)
    stop_on_sigterm()
    serving = False
    try:
        stack.start(ready_timeout=args.ready_timeout)
        serving = True
        served = args.archive or args.model or "the offline tiny model (random weights)"
        print(f"llava-sessions: serving {served} "
              f"with {n_workers} worker(s) at {stack.url}  (POST /invocations, GET /ping; "
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
