"""Prefix reuse: what the server's prefix cache saves, and what it costs in memory.

Three measurements on one random model of a preset's shape (2B-4T, 30 layers by default), written once as a
TQ2_0 .gguf with a synthetic byte-level BPE vocabulary and a chat template (serve_load.build_gguf), served on
127.0.0.1 with the same thread count:

  ttft    time to first token of a request whose --prefix-tokens prefix the server has seen (a warm-up request
          with the same prefix and another tail ran first), with the prefix cache and with --no-prefix-cache
  chat    a multi-turn chat replay: a --document-tokens system document, --turns user turns of about
          --user-tokens tokens, --answer-tokens tokens per answer (end tokens suppressed), the same client
          against pybitnet's server and llama-cpp-python's OpenAI server on the same file: TTFT per turn and
          the replay's wall time
  soak    --soak-s seconds of requests with distinct random prefixes (--soak-prompt tokens, 2 in flight) against a
          server with the default budget: the server's RSS sampled each second, its growth against the budget

    python benchmarks/prefix_reuse.py --json benchmarks/results/prefix_reuse.json \\
        --plot benchmarks/results/prefix_chat_ttft.png

Quick check at a tiny size:
    python benchmarks/prefix_reuse.py --preset small --layers 2 --prefix-tokens 200 --document-tokens 200 \\
        --turns 3 --soak-s 10 --soak-prompt 100
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import build_gguf, make_prompts, start_server, stop_server  # noqa: E402

from pybitnet.serve.prefix_cache import DEFAULT_BUDGET_MB  # noqa: E402

# The 2B-4T chat format ("Role: content<|eot_id|>"), rendered by both servers from the file's metadata.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)
REQUEST_TIMEOUT_S = 1800


def _first_token_time(url: str, path: str, body: dict) -> tuple[float, float, dict | None, str]:
    """Stream one request: (seconds to the first generated text, seconds to the end, usage, text)."""
    start = time.perf_counter()
    first, usage, pieces = None, None, []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True, "stream_options": {"include_usage": True}},
                      timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{path}: HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                if piece:
                    first = first if first is not None else time.perf_counter()
                    pieces.append(piece)
    end = time.perf_counter()
    return (first or end) - start, end - start, usage, "".join(pieces)


def measure_ttft(gguf: Path, args, vocab: int, log_dir: Path) -> dict:
    rng = random.Random(args.seed)
    prefix = [rng.randrange(3, vocab - 3) for _ in range(args.prefix_tokens)]
    tails = [[rng.randrange(3, vocab - 3) for _ in range(args.tail_tokens)] for _ in range(1 + args.rounds)]
    ctx = args.prefix_tokens + args.tail_tokens + 64
    out = {}
    for name, extra in (("prefix_cache", ()), ("no_prefix_cache", ("--no-prefix-cache",))):
        process, url = start_server("pybitnet", gguf, args.threads, ctx, 2, log_dir / f"ttft-{name}.log", extra)
        try:
            body = {"model": "model", "max_tokens": 1, "temperature": 0}
            _first_token_time(url, "/v1/completions", {**body, "prompt": prefix + tails[0]})  # the server sees it
            times, cached = [], []
            for tail in tails[1:]:
                ttft, _, usage, _ = _first_token_time(url, "/v1/completions", {**body, "prompt": prefix + tail})
                times.append(ttft)
                cached.append((usage or {}).get("prompt_tokens_details", {}).get("cached_tokens"))
        finally:
            stop_server(process)
        out[name] = {"ttft_s": times, "median_ttft_s": sorted(times)[len(times) // 2], "cached_tokens": cached}
        print(name, json.dumps(out[name]), flush=True)
    out["speedup"] = out["no_prefix_cache"]["median_ttft_s"] / out["prefix_cache"]["median_ttft_s"]
    out["prompt_tokens"] = args.prefix_tokens + args.tail_tokens
    print(f"TTFT with a seen {args.prefix_tokens}-token prefix: {out['speedup']:.1f}x lower", flush=True)
    return out


def chat_replay(url: str, tokenizer, args) -> dict:
    document = make_prompts(tokenizer, 1, args.document_tokens, args.document_tokens, args.seed + 100)[0]
    users = make_prompts(tokenizer, args.turns, args.user_tokens - 10, args.user_tokens + 10, args.seed + 200)
    vocab = tokenizer.get_vocab_size()
    messages = [{"role": "system", "content": document}]
    turns = []
    start = time.perf_counter()
    for text in users:
        messages.append({"role": "user", "content": text})
        body = {"model": "model", "messages": messages, "max_tokens": args.answer_tokens, "temperature": 0,
                "ignore_eos": True, "logit_bias": {str(vocab - 2): -100, str(vocab - 1): -100}}
        ttft, total, usage, answer = _first_token_time(url, "/v1/chat/completions", body)
        messages.append({"role": "assistant", "content": answer})
        turns.append({"ttft_s": ttft, "total_s": total, "usage": usage})
        print(json.dumps(turns[-1]), flush=True)
    wall = time.perf_counter() - start
    later = [t["ttft_s"] for t in turns[1:]]
    return {"turns": turns, "wall_s": wall, "mean_ttft_turns_2_on_s": sum(later) / max(1, len(later))}


def soak(gguf: Path, args, vocab: int, log_dir: Path) -> dict:
    import psutil

    ctx = args.soak_prompt + 64
    process, url = start_server("pybitnet", gguf, args.threads, ctx, 2, log_dir / "soak.log")
    server = psutil.Process(process.pid)
    samples, stop = [], threading.Event()
    rng = random.Random(args.seed + 1)

    def request() -> None:
        prompt = [rng.randrange(3, vocab - 3) for _ in range(args.soak_prompt)]
        httpx.post(f"{url}/v1/completions", json={"model": "model", "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 0}, timeout=REQUEST_TIMEOUT_S)

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), server.memory_info().rss))
            stop.wait(1.0)

    def client() -> None:
        while not stop.is_set():
            request()
            done[0] += 1

    try:
        request()  # the first request allocates what every request reuses
        base = server.memory_info().rss
        done = [0]
        threads = [threading.Thread(target=sample)] + [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(args.soak_s)
        stop.set()
        for t in threads:
            t.join()
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        stop_server(process)
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith(("pybitnet_prefix_cache", "pybitnet_prompt_tokens_c")) and "_created" not in line}
    budget = DEFAULT_BUDGET_MB << 20
    peak = max(rss for _, rss in samples)
    result = {"seconds": args.soak_s, "requests": done[0], "prompt_tokens_each": args.soak_prompt,
              "rss_after_first_request_mib": base / 2**20, "rss_peak_mib": peak / 2**20,
              "rss_end_mib": samples[-1][1] / 2**20, "growth_mib": (peak - base) / 2**20, "budget_mib": budget / 2**20,
              "growth_over_budget": (peak - base) / budget, "metrics": values}
    print("soak", json.dumps(result), flush=True)
    return result


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for engine, replay in results["chat"].items():
        ttft = [t["ttft_s"] for t in replay["turns"]]
        ax.plot(range(1, len(ttft) + 1), ttft, marker="o", label=f"{engine} (replay {replay['wall_s']:.0f} s)")
    ax.set_yscale("log")
    ax.set_xlabel("turn")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"Chat replay, {results['model']}, {results['threads']} threads")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bitnet-b1.58-2b-4t")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="ttft,chat,soak")
    parser.add_argument("--prefix-tokens", type=int, default=1536)
    parser.add_argument("--tail-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--document-tokens", type=int, default=1500)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--user-tokens", type=int, default=60)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--engines", default="pybitnet,llama_cpp")
    parser.add_argument("--soak-s", type=float, default=600)
    parser.add_argument("--soak-prompt", type=int, default=512)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--log-dir", help="keep the servers' logs here")
    args = parser.parse_args()
    parts = args.parts.split(",")
    results = {"model": f"{args.preset} ({args.layers} layers, TQ2_0)", "threads": args.threads,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        # Printable tokens: a random model's answers are then text that streams as it is generated (with bytes
        # of broken UTF-8 a server holds its output back, and the first token would seem to come late).
        gguf, tokenizer = build_gguf(Path(tmp), args.preset, args.layers, args.seed, chat_template=CHAT_TEMPLATE,
                                     printable=True)
        logs = Path(args.log_dir) if args.log_dir else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        vocab = tokenizer.get_vocab_size()
        if "ttft" in parts:
            results["ttft"] = measure_ttft(gguf, args, vocab, logs)
        if "chat" in parts:
            results["chat"] = {}
            ctx = args.document_tokens + args.turns * (args.user_tokens + args.answer_tokens + 40) + 256
            for engine in args.engines.split(","):
                process, url = start_server(engine, gguf, args.threads, ctx, 2, logs / f"chat-{engine}.log")
                try:
                    results["chat"][engine] = chat_replay(url, tokenizer, args)
                finally:
                    stop_server(process)
                print(engine, f"mean TTFT turns 2+: {results['chat'][engine]['mean_ttft_turns_2_on_s']:.2f} s, "
                      f"replay {results['chat'][engine]['wall_s']:.1f} s", flush=True)
            if {"pybitnet", "llama_cpp"} <= set(results["chat"]):
                ours, theirs = results["chat"]["pybitnet"], results["chat"]["llama_cpp"]
                results["chat_ratios"] = {
                    "mean_ttft_turns_2_on": ours["mean_ttft_turns_2_on_s"] / theirs["mean_ttft_turns_2_on_s"],
                    "wall": ours["wall_s"] / theirs["wall_s"]}
                print("pybitnet / llama.cpp:", json.dumps(results["chat_ratios"]), flush=True)
        if "soak" in parts:
            results["soak"] = soak(gguf, args, vocab, logs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.plot and "chat" in results:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
