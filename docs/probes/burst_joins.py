"""Eight follow-ups at once through the served stack, against one alone: when each answer ends.

The bench's concurrency scenario, opened up: the first follow-up of the burst finds the worker
idle and goes as a bundle of one; the other seven join it at its first step's end
(handler/joiners.py) instead of waiting for it to finish. Prints, per round, the lone turn's
time, the burst's wall time and each answer's end (ms after the burst began), and the ratio of
aggregate tokens/s (8 sessions ÷ 1) the bench reports.

    .venv/bin/python docs/probes/burst_joins.py
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from _served import Endpoint, noise_jpeg, served_stack

MAX_NEW = 24  # the bench's


def main() -> None:
    _, image_b64 = noise_jpeg()
    with served_stack() as (router, _worker, _work):
        url = f"http://{router.conn.host}:{router.conn.port}{router.path}"
        clients = [Endpoint(url) for _ in range(9)]
        sessions = []
        for client in clients:
            _, _, header = client.post({"requestType": "NEW_SESSION", "images": [image_b64]}, "NEW_SESSION")
            sessions.append(header.split(";")[0])
            client.post({"prompt": "What is in the picture?", "max_new_tokens": MAX_NEW}, sessions[-1])
        for round_ in range(4):
            question = {"prompt": f"Describe the colours, round {round_}.", "max_new_tokens": MAX_NEW}
            alone, _, _ = clients[0].post(question, sessions[0])
            barrier = threading.Barrier(8)

            def follow_up(i):
                barrier.wait()
                started = time.perf_counter()
                seconds, status, _ = clients[i + 1].post(question, sessions[i + 1])
                assert status == 200
                return started, started + seconds

            with ThreadPoolExecutor(8) as pool:
                spans = list(pool.map(follow_up, range(8)))
            begin = min(start for start, _ in spans)
            wall = max(end for _, end in spans) - begin
            ends = sorted(round((end - begin) * 1000, 1) for _, end in spans)
            print(f"round {round_ + 1}: alone {alone * 1000:.1f} ms, burst of 8 {wall * 1000:.1f} ms "
                  f"(8 x alone / burst = {8 * alone / wall:.2f}); ends {ends}")


if __name__ == "__main__":
    main()
