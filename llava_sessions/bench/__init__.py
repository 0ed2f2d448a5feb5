"""``llava-sessions bench``: one conversation about one image, timed through four strategies.

Then (unless --no-long-conversation) a long conversation, about 2,500 tokens of history with three
images (capped to the model's context), timed served against stateless on its last turns. The
result also names its absolute figures (``absolute``: follow-up TTFT, cold open, decode tokens/s
of one session and of --concurrency sessions).

Modules: ``stats`` (medians, ratios, targets; torch-free), ``inprocess`` (the reference run and
strategies (b) stateless, (c) pixel cache, (d) floor), ``served`` (strategy (a): the real stack
over HTTP; torch-free), ``runner`` (the whole run, returns one dict), ``report`` (table, plot).
"""

from __future__ import annotations

import json
import math
import sys


def main(args) -> int:
    """Entry point of ``cmd_bench``; ``args`` comes from the CLI parser."""
    from llava_sessions.bench import report

    # --plot's needs are checked before the run (minutes), not after it.
    if args.plot:
        reason = report.plot_unavailable()
        if reason is None and not args.plot.parent.is_dir():
            reason = f"--plot {args.plot}: the folder {args.plot.parent} does not exist"
        if reason:
            print(f"llava-sessions bench: {reason}", file=sys.stderr)
            return 2

    from llava_sessions.bench.runner import BenchError, Options, run

    options = Options(
        preset=args.preset,
        model=args.model,
        turns=args.turns,
        repeats=args.repeats,
        max_new_tokens=args.max_new_tokens,
        concurrency=args.concurrency,
        device=args.device,
        budget_gb=args.budget_gb,
        compile=args.compile,
        long_conversation=args.long_conversation,
    )

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        result = run(options, log=log)
    except BenchError as exc:
        print(f"llava-sessions bench: {exc}", file=sys.stderr)
        return 2
    result["plot"] = None
    if args.plot:
        reason = report.plot(result, str(args.plot))
        result["plot"] = {"path": str(args.plot), "drawn": reason is None, "reason": reason}
        if reason:
            log(f"llava-sessions bench: {reason}")
    if args.json:
        print(json.dumps(_finite(result), indent=2))
    else:
        print(report.table(result))
    if result["answers_match_reference"]:
        return 0
    listing = "\n  ".join(result["mismatches"])
    if result["answers_match_up_to_near_ties"]:
        print("llava-sessions bench: some answers part from the reference, each at a near tie of the best two"
              f" logits (rounding of {result['dtype']}, not a fault; see mismatch_analysis):\n  {listing}",
              file=sys.stderr)
        return 0
    print(f"llava-sessions bench: the server's answers differ from the reference run:\n  {listing}", file=sys.stderr)
    return 1


def workers_main(args) -> int:
    """``--workers-scaling``: one worker against two (bench/workers.py)."""
    from llava_sessions.bench import workers

    device = "cpu" if args.device == "auto" else args.device
    options = workers.Options(preset=args.preset, model=args.model, sessions=args.concurrency,
                              turns=args.turns, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                              device=device)
    result = workers.run(options, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(json.dumps(_finite(result), indent=2) if args.json else workers.table(result))
    return 0


def _finite(value):
    """JSON has no NaN/Infinity: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
