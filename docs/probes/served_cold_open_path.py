"""Served (`serve` stack in a process of its own, one worker, the `small` preset, compiled): where a
cold open's time goes. Opens with a 640x480 JPEG and a question (one token) alternate between the
router and TorchServe's own endpoint for the worker (the router's hop skipped); straight to
TorchServe, a close of an unknown session times its round trip for a trivial body and for one
carrying the same base64 image in an extra field (refused by the handler before any work).
Usage:
    .venv/bin/python docs/probes/served_cold_open_path.py"""

import statistics

from _served import noise_jpeg, served_stack


def main() -> None:
    _, image = noise_jpeg()
    unknown = "no-such-session-0123456789abcdef"
    times: dict[str, list[float]] = {"open via the router": [], "open straight to TorchServe": [],
                                     "trivial, straight": [], "image-sized body, straight": []}
    open_body = {"requestType": "NEW_SESSION", "images": [image], "prompt": "What is in the picture?",
                 "max_new_tokens": 1}
    with served_stack() as (router, worker, _):
        for k in range(30):
            endpoint, name = (router, "open via the router") if k % 2 else (worker, "open straight to TorchServe")
            seconds, status, header = endpoint.post(open_body, "NEW_SESSION")
            assert status == 200
            times[name].append(seconds)
            router.post({"requestType": "CLOSE"}, header.split(";")[0])
            seconds, status, _ = worker.post({"requestType": "CLOSE"}, unknown)
            assert status == 404
            times["trivial, straight"].append(seconds)
            seconds, status, _ = worker.post({"requestType": "CLOSE", "padding": image}, unknown)
            assert status == 400
            times["image-sized body, straight"].append(seconds)
    print(f"base64 image: {len(image) // 1024} KB")
    for name, samples in times.items():
        print(f"{name:30s} {statistics.median(samples) * 1e3:6.2f} ms (median of {len(samples)})")


if __name__ == "__main__":
    main()
