"""Big prompts against a running server: its RSS before and after bursts, and how fast /health answers meanwhile.

Starts `pybitnet serve [MODEL] [SERVE OPTIONS]` on a free loopback port, waits until it is healthy, then sends
sixteen concurrent 5 MB prompts and four concurrent 20 MB prompts (each refused: 413 above --max-request-bytes,
400 when the text cannot fit the context), probing /health every 50 ms throughout, and reads the server's RSS
2 s after each burst.

    python benchmarks/serve_memory_bursts.py                                   # the built-in model, defaults
    python benchmarks/serve_memory_bursts.py --serve-args "--max-request-bytes 64000000"   # bodies read and parsed
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slowest_health(url: str, stop: threading.Event, worst: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        try:
            httpx.get(f"{url}/health", timeout=30)
        except httpx.HTTPError:
            pass
        worst[0] = max(worst[0], time.perf_counter() - start)
        time.sleep(0.05)


def burst(url: str, count: int, megabytes: int) -> dict:
    body = json.dumps({"prompt": "word " * (megabytes * 2**20 // 5), "max_tokens": 4}).encode()
    worst, stop = [0.0], threading.Event()
    prober = threading.Thread(target=slowest_health, args=(url, stop, worst))
    prober.start()

    def post(_):
        try:
            return httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"},
                              timeout=300).status_code
        except httpx.HTTPError as err:
            return type(err).__name__

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        statuses = list(pool.map(post, range(count)))
    stop.set()
    prober.join()
    return {"prompts": count, "megabytes_each": megabytes, "statuses": sorted(set(map(str, statuses))),
            "slowest_health_ms": worst[0] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="MODEL spec [default: the built-in model]")
    parser.add_argument("--json")
    parser.add_argument("--serve-args", default="", help="more `pybitnet serve` options, in one string")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "pybitnet", "serve", *([args.model] if args.model else []), "--port", str(port),
               "--log-level", "warning", *shlex.split(args.serve_args)]
    process = subprocess.Popen(command, env={**os.environ, "MKL_CBWR": "AUTO"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit {process.poll()})")
            time.sleep(0.1)
        time.sleep(2)
        rss = lambda: psutil.Process(process.pid).memory_info().rss / 2**20  # noqa: E731
        idle, stop = [0.0], threading.Event()
        prober = threading.Thread(target=slowest_health, args=(url, stop, idle))
        prober.start()
        time.sleep(2.5)
        stop.set()
        prober.join()
        results = {"command": " ".join(command[1:]), "start_rss_mib": rss(), "idle_slowest_health_ms": idle[0] * 1000,
                   "bursts": []}
        for count, megabytes in ((16, 5), (4, 20)):
            result = burst(url, count, megabytes)
            time.sleep(2)
            result["rss_after_mib"] = rss()
            result["growth_mib"] = result["rss_after_mib"] - results["start_rss_mib"]
            results["bursts"].append(result)
            print(json.dumps(result), flush=True)
        print(json.dumps({k: v for k, v in results.items() if k != "bursts"}), flush=True)
    finally:
        process.terminate()
        process.wait(60)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
