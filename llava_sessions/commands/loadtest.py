"""``llava-sessions loadtest`` (llava_sessions/loadtest.py does the work)."""

from __future__ import annotations

import http.client
import json
import sys

import requests

from llava_sessions.loadtest import (
    DEFAULT_RSS_MARGIN_FRACTION,
    DEFAULT_RSS_MARGIN_MIB,
    LoadTestError,
    Options,
    report,
    run,
)


def register(commands) -> None:
    parser = commands.add_parser(
        "loadtest",
        help="load (concurrent conversations) and soak (open/close churn, leak check) over loopback",
        description="Phase 1: --sessions conversations at once, each an open, --turns turns and a close; "
        "latency percentiles per request kind, statuses, tokens/s. Phase 2: --cycles open/close cycles, "
        "then the engine's sessions and bytes held (Prometheus) must be back to the baseline and the "
        "workers' RSS within the margin. Starts the stack itself (the offline tiny model, one worker, "
        "a free loopback port) unless --url is given. Exits 1 on any 5xx, leak or time-guard stop.",
    )
    parser.add_argument("--url", help="a running server's base URL instead of starting one")
    parser.add_argument("--metrics-url", help="with --url: TorchServe's Prometheus URL, e.g. "
                        "http://127.0.0.1:8082/metrics; without it the engine's leak checks are skipped")
    parser.add_argument("--management-url", help="with --url: TorchServe's management API, e.g. "
                        "http://127.0.0.1:8081, for the worker pids (same host); without it the RSS checks are "
                        "skipped")
    parser.add_argument("--model", help="checkpoint directory or hub id (default: the --preset offline model)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"], help="offline random-weight model")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N, for the stack this command starts")
    parser.add_argument("--sessions", type=int, default=32, help="concurrent conversations; 0 skips the load phase")
    parser.add_argument("--turns", type=int, default=10,
                        help="turns per conversation; the tiny model's 512-token context holds ~15")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length per turn")
    parser.add_argument("--cycles", type=int, default=10_000, help="soak open/close cycles; 0 skips the soak")
    parser.add_argument("--soak-threads", type=int, default=4, help="soak client threads")
    parser.add_argument("--max-seconds", type=float, default=1800,
                        help="time guard for both phases, counted once the server is ready")
    parser.add_argument("--request-timeout", type=float, default=120, help="seconds per request")
    parser.add_argument("--rss-margin", type=float, default=DEFAULT_RSS_MARGIN_FRACTION, metavar="FRACTION",
                        help="allowed RSS growth as a fraction of the baseline (default: %(default).2f)")
    parser.add_argument("--rss-margin-mib", type=float, default=DEFAULT_RSS_MARGIN_MIB, metavar="MIB",
                        help="allowed RSS growth in MiB; the larger of the two applies (default: %(default)g)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.set_defaults(run=cmd_loadtest)


def cmd_loadtest(args) -> int:
    options = Options(
        url=args.url, metrics_url=args.metrics_url, management_url=args.management_url, model=args.model,
        preset=args.preset, device=args.device, sessions=args.sessions, turns=args.turns,
        max_new_tokens=args.max_new_tokens, cycles=args.cycles, soak_threads=args.soak_threads,
        max_seconds=args.max_seconds, request_timeout=args.request_timeout,
        rss_margin_fraction=args.rss_margin, rss_margin_mib=args.rss_margin_mib,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        result = run(options, log=log)
    except (LoadTestError, requests.RequestException, OSError, http.client.HTTPException) as error:
        print(f"llava-sessions loadtest: {error}", file=sys.stderr)
        return 2
    if result["aborted"]:
        log(f"llava-sessions loadtest: stopped by the time guard (--max-seconds {options.max_seconds:g}); "
            "the figures cover only the work done before it")
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0 if result["passed"] else 1

