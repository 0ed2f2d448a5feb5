"""``llava-sessions bench``: one conversation through four strategies, or workers scaling."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="time one multi-turn conversation: our stack over HTTP vs stateless, pixel-cache and floor",
        description="Time one conversation of K turns about one image through (a) our serving stack over "
        "HTTP, (b) a stateless model.generate, (c) the AWS sample's pixel cache and (d) the bare floor, "
        "on identical token histories. --preset llava-1.5-7b or llava-next-mistral-7b writes a ~14-15 GB "
        "float16 random-weight checkpoint of that exact shape to the cache once (for a GPU), onevision-0.5b "
        "a ~2 GB one (float32 on a CPU); --model DIR uses an existing checkpoint instead.",
    )
    bench.add_argument("--preset", default="small", choices=["tiny", "small", "llava-1.5-7b", "llava-next-mistral-7b", "onevision-0.5b"],
                       help="random-weight model shape; the ratios are held to targets only for small on a "
                       "CPU and llava-1.5-7b on a GPU")
    bench.add_argument("--model", help="existing checkpoint directory (overrides the preset's weights; held to "
                       "a preset's targets only if it has that preset's shape)")
    bench.add_argument("--turns", type=int, default=6, help="turns in the conversation, at least 2")
    bench.add_argument("--repeats", type=int, default=3, help="repeats per turn; medians are reported")
    bench.add_argument("--max-new-tokens", type=int, default=24, help="answer length of the reference turns")
    bench.add_argument("--concurrency", type=int, default=8, help="sessions taking turns at once")
    bench.add_argument("--device", default="auto", help="auto (cuda:0 if present, else cpu), cpu or cuda:N")
    bench.add_argument("--budget-gb", type=float, help="memory budget for the sessions-fit figure (default: free memory)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    bench.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="also draw TTFT per turn into FILE.png (needs matplotlib: pip install "
                       "'llava-sessions[bench]'; checked before the run)")
    bench.add_argument("--workers-scaling", action="store_true",
                       help="instead: aggregate tokens/s of one worker, two workers sharing the cores, and two "
                       "workers each on every core (--concurrency sessions x --turns turns, --repeats rounds)")
    bench.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                       help="the served worker's decode step: compiled (on), eager (off), or on for a GPU only")
    bench.add_argument("--long-conversation", action=argparse.BooleanOptionalAction, default=True,
                       help="also time a long conversation: about 2,500 tokens of history with three images "
                       "(capped to the model's context less an answer: about 2,000 on small), its last 3 "
                       "turns' TTFT ours vs stateless; adds about 20 s to a small run on 2 CPU cores, a "
                       "few on tiny (default: on, every preset)")
    bench.set_defaults(run=cmd_bench)


def cmd_bench(args) -> int:
    from llava_sessions import bench

    if args.workers_scaling:
        return bench.workers_main(args)
    return bench.main(args)
