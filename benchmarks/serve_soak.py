"""Soak test of `pybitnet serve`: mixed streaming, non-streaming and cancelled requests for a fixed time.

The server runs as a subprocess on 127.0.0.1; `--workers` clients loop until `--duration` seconds have
passed, each request picked at random (seeded): a streaming completion read to the end, a non-streaming
completion, or a stream the client drops after a few chunks. The server's RSS is sampled every
`--sample-every` seconds. At the end every request must be accounted for — answered completely, refused
with 503, or cancelled by its client, and none lost or hung — and the server's own counters must agree
(/metrics: nothing running or waiting, finished done + cancelled = what the clients saw). RSS growth is
measured from the end of `--warmup` seconds to the end of the run.

    python benchmarks/serve_soak.py --duration 600 --json benchmarks/results/serve_soak.json
Quick check: python benchmarks/serve_soak.py --duration 20 --warmup 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

# A request that takes longer than this counts as hung.
HUNG_AFTER_S = 120
# A client told the queue is full waits this long before its next request.
REFUSED_BACKOFF_S = 0.25


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def one_request(client: httpx.AsyncClient, url: str, rng: random.Random, vocab: int) -> str:
    """Run one random request; returns its outcome: answered | cancelled | refused | error:... | hung."""
    prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 200))]
    kind = rng.choice(["stream", "whole", "cancel"])
    body = {"prompt": prompt, "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0.0, 0.8]),
            "seed": rng.randrange(1000), "ignore_eos": True, "stream": kind != "whole",
            "logprobs": rng.choice([None, 2])}
    try:
        if kind == "whole":
            response = await client.post(f"{url}/v1/completions", json=body, timeout=HUNG_AFTER_S)
            if response.status_code == 503:
                return "refused"
            if response.status_code != 200:
                return f"error:{response.status_code}"
            tokens = response.json()["choices"][0]["token_ids"]
            return "answered" if len(tokens) == body["max_tokens"] else "error:short"
        async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=HUNG_AFTER_S) as response:
            if response.status_code == 503:
                return "refused"
            if response.status_code != 200:
                return f"error:{response.status_code}"
            keep = rng.randint(1, 4) if kind == "cancel" else None
            tokens, done = 0, False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    tokens += sum(len(c.get("token_ids", [])) for c in chunk.get("choices", []))
                    if keep is not None and tokens >= keep:
                        return "cancelled"  # leaving the block closes the connection mid-stream
            if done and tokens == body["max_tokens"]:
                return "answered"
            return "error:incomplete"
    except httpx.TimeoutException:
        return "hung"
    except httpx.HTTPError as err:
        return f"error:{type(err).__name__}"


async def load(url: str, duration: float, workers: int, seed: int, vocab: int) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    stop_at = time.monotonic() + duration

    async def worker(index: int):
        rng = random.Random(seed * 1000 + index)
        async with httpx.AsyncClient() as client:
            while time.monotonic() < stop_at:
                outcome = await one_request(client, url, rng, vocab)
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome == "refused":
                    await asyncio.sleep(REFUSED_BACKOFF_S)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return outcomes


async def sample_rss(pid: int, every: float, samples: list[tuple[float, float]], stop: asyncio.Event) -> None:
    process = psutil.Process(pid)
    start = time.monotonic()
    while not stop.is_set():
        samples.append((time.monotonic() - start, process.memory_info().rss / 2**20))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def soak(url: str, pid: int, args) -> tuple[dict[str, int], list[tuple[float, float]]]:
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, args.sample_every, samples, stop))
    outcomes = await load(url, args.duration, args.workers, args.seed, args.vocab)
    stop.set()
    await sampler
    return outcomes, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="synthetic:small")
    parser.add_argument("--vocab", type=int, default=2048, help="the model's vocabulary size (prompt ids)")
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=60)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample-every", type=float, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "pybitnet", "serve", args.model, "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
                               "--threads", str(args.threads), "--ctx", "288", "--log-level", "warning"],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; its log: {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        outcomes, samples = asyncio.run(soak(url, server.pid, args))
        time.sleep(1)  # let the last cancellations reach the scheduler
        counters = metrics(url)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    after_warmup = [rss for t, rss in samples if t >= args.warmup]
    growth = (max(after_warmup) - after_warmup[0]) if after_warmup else None
    finished_done = counters.get('pybitnet_requests_finished_total{outcome="done"}', 0)
    finished_cancelled = counters.get('pybitnet_requests_finished_total{outcome="cancelled"}', 0)
    errors = {k: v for k, v in outcomes.items() if k.startswith("error") or k == "hung"}
    seen_by_clients = outcomes.get("answered", 0) + outcomes.get("cancelled", 0)
    result = {
        "duration_s": args.duration, "model": args.model, "workers": args.workers, "max_batch": args.max_batch,
        "requests": sum(outcomes.values()), "outcomes": outcomes,
        "server_finished_done": finished_done, "server_finished_cancelled": finished_cancelled,
        "server_running_at_end": counters.get("pybitnet_requests_running"),
        "server_waiting_at_end": counters.get("pybitnet_requests_waiting"),
        # every request the server took ended as done or cancelled, as many as the clients saw
        "accounted": finished_done + finished_cancelled == seen_by_clients,
        "rss_mib_first": samples[0][1] if samples else None, "rss_mib_after_warmup": after_warmup[0] if after_warmup else None,
        "rss_mib_max": max(r for _, r in samples) if samples else None, "rss_growth_after_warmup_mib": growth,
        "rss_samples": samples,
    }
    result["passed"] = (not errors and result["accounted"] and result["server_running_at_end"] == 0
                        and result["server_waiting_at_end"] == 0 and growth is not None and growth < 50)
    summary = {k: v for k, v in result.items() if k != "rss_samples"}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    os.unlink(log.name) if result["passed"] else print(f"server log: {log.name}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
