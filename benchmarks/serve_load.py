"""Serving benchmark: pybitnet's server and llama-cpp-python's OpenAI server on one model, side by side.

A random model of a preset's shape (2B-4T by default) is written once as a Hugging Face checkpoint with a
synthetic byte-level BPE vocabulary of the model's size, converted to GGUF TQ2_0 with `pybitnet convert`,
and both servers load that one .gguf file on 127.0.0.1 with the same thread count. The same workload runs
against each, one concurrency level at a time: `requests` streaming completions whose prompts are
`--prompt-min`..`--prompt-max` tokens (seeded) and whose outputs are `--max-tokens` tokens, at most
`concurrency` in flight. Reported per level, as vLLM's and SGLang's serving benchmarks do: TTFT p50/p99,
inter-token latency p50/p99, end-to-end latency p50/p99 and output tokens/s over the whole level.

    python benchmarks/serve_load.py --json benchmarks/results/serve_load.json \
        --markdown benchmarks/results/serve_load.md --plot benchmarks/results/serve_load.png

Batch invariance on the same model (pybitnet only): --invariance 32 runs 32 prompts one at a time and then in
crowds of 16 (greedy, --max-tokens each, logprobs on) and reports any request whose tokens or logprobs differ.

The cost of batch invariance in one decode step (no server; best of 5 per shape, MKL_CBWR=AUTO as the server
runs): python benchmarks/serve_load.py --decode-shapes

Quick check at a tiny size: python benchmarks/serve_load.py --preset small --layers 2 --requests 4 --max-tokens 8 \
    --prompt-min 8 --prompt-max 32 --concurrency 1,4
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
from pathlib import Path

import httpx

# Seconds a server may take to load before the run gives up on it.
STARTUP_TIMEOUT_S = 900
# Seconds one request may take before it counts as failed (bounds a level's run time).
REQUEST_TIMEOUT_S = 1800


# -- the model -------------------------------------------------------------------------------------------------


def synthetic_bpe(vocab_size: int, printable: bool = False):
    """A byte-level BPE of exactly `vocab_size` tokens: 256 byte symbols, merges of symbol pairs (then of
    pairs with a third symbol) for the rest, and BOS/EOS/EOT at the end, shaped like a LLaMA-3 tokenizer.
    `printable`: merges of printable ASCII only, so that a random sequence of tokens is text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from pybitnet.tokenizer import LLAMA3_SPLIT_REGEX, byte_level_alphabet

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    letters = sorted(alphabet)
    vocab = {symbol: i for i, symbol in enumerate(letters)}
    if printable:
        symbol_of = byte_level_alphabet()
        letters = sorted(symbol_of[b] for b in range(0x20, 0x7F))
    merges = []
    wanted = vocab_size - 3
    rng = random.Random(0)
    pairs = [(a, b) for a in letters for b in letters]
    rng.shuffle(pairs)
    for a, b in pairs:
        if len(vocab) >= wanted:
            break
        vocab[a + b] = len(vocab)
        merges.append((a, b))
    doubles = [t for t in vocab if len(t) == 2]
    while len(vocab) < wanted:
        a, b = rng.choice(doubles), rng.choice(letters)
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    for token in specials:
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return backend


def build_gguf(directory: Path, preset_name: str, layers: int, seed: int,
               chat_template: str | None = None, printable: bool = False) -> tuple[Path, object]:
    """The TQ2_0 .gguf both servers load, and its tokenizer (with `chat_template`, written to the file's metadata
    for both servers to render chats with)."""
    from pybitnet.config import preset
    from pybitnet.loaders.hf import save_hf
    from pybitnet.synthetic import random_weights

    config = preset(preset_name).replace(num_layers=layers)
    tokenizer = synthetic_bpe(config.vocab_size, printable)
    config = config.replace(bos_token_id=config.vocab_size - 3, eos_token_ids=(config.vocab_size - 2, config.vocab_size - 1))
    checkpoint = directory / "hf"
    save_hf(checkpoint, config, random_weights(config, seed))
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    gguf = directory / "model-tq2_0.gguf"
    subprocess.run([sys.executable, "-m", "pybitnet", "convert", str(checkpoint), str(gguf), "--type", "tq2_0"],
                   check=True)
    return gguf, tokenizer


def make_prompts(tokenizer, count: int, shortest: int, longest: int, seed: int) -> list[str]:
    """`count` texts of shortest..longest tokens (uniform, seeded), made of random lowercase words."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        target = rng.randint(shortest, longest)
        words = []
        while len(tokenizer.encode(" ".join(words)).ids) < target:
            words.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))))
        while len(words) > 1 and len(tokenizer.encode(" ".join(words)).ids) > target:
            words.pop()
        prompts.append(" ".join(words))
    return prompts


# -- the servers -----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(engine: str, gguf: Path, threads: int, ctx: int, max_batch: int, log: Path, extra: tuple = ()):
    """A server on a free loopback port, once it answers: (process, url). `extra`: more pybitnet serve options."""
    port = free_port()
    if engine == "pybitnet":
        command = [sys.executable, "-m", "pybitnet", "serve", str(gguf), "--port", str(port), "--threads", str(threads),
                   "--ctx", str(ctx), "--max-batch", str(max_batch), "--max-queue", "1024", "--name", "model", *extra]
    else:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                   "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   # twice the room: llama-cpp-python overflows its logits buffer when a request runs to n_ctx
                   "--n_ctx", str(2 * ctx), "--n_batch", "512", "--model_alias", "model",
                   # its defaults cancel a running stream when another arrives, and keep every position's logits
                   "--interrupt_requests", "False", "--logits_all", "False"]
    return launch(engine, command, port, threads, log)


def launch(name: str, command: list[str], port: int, threads: int, log: Path):
    """Run a server command with its output in `log`; (process, url) once /v1/models answers on `port`."""
    out = open(log, "w")
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{name} server did not start within {STARTUP_TIMEOUT_S} s; see {log}")


def stop_server(process) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- the load --------------------------------------------------------------------------------------------------


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, stop_ids: list[int]) -> dict:
    # Every request produces max_tokens: pybitnet takes ignore_eos, llama-cpp-python a logit bias against the
    # end tokens (each server ignores the other's field).
    body = {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "logit_bias": {str(t): -100 for t in stop_ids},
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, usage, token_chunks = [], None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices"):
                arrivals.append(time.perf_counter())
                choice = chunk["choices"][0]
                token_chunks += bool(choice.get("text") or choice.get("finish_reason") is None)
    end = time.perf_counter()
    # A server that sends no usage chunk (llama-cpp-python) streams one chunk per token, then an empty one with
    # the finish reason.
    # (More chunks than max_tokens were seen from llama-cpp-python under concurrent streams at a tiny size; a
    # request cannot have produced more than it asked for.)
    tokens = usage["completion_tokens"] if usage else min(token_chunks, max_tokens)
    if not arrivals:
        return {"ok": False, "status": "no tokens"}
    return {"ok": True, "ttft": arrivals[0] - start, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "e2e": end - start, "tokens": tokens}


async def run_level(url: str, prompts: list[str], concurrency: int, max_tokens: int, stop_ids: list[int]) -> dict:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        async def limited(prompt):
            async with gate:
                try:
                    return await one_request(client, url, prompt, max_tokens, stop_ids)
                except httpx.HTTPError as err:
                    return {"ok": False, "status": type(err).__name__}

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok]
    e2e = [r["e2e"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(prompts), "failed": len(results) - len(ok),
            "failures": sorted({str(r["status"]) for r in results if not r["ok"]}),
            "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50),
            "itl_p99_s": pct(itl, 99), "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99)}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def invariance(url: str, prompts: list[str], max_tokens: int, stop_ids: list[int], crowd: int) -> dict:
    """Greedy outputs of each prompt alone and among crowd-1 others: tokens and logprobs must be identical."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        async def complete(prompt):
            body = {"model": "model", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1,
                    "ignore_eos": True}
            choice = (await client.post(f"{url}/v1/completions", json=body)).json()["choices"][0]
            return choice["token_ids"], choice["logprobs"]["token_logprobs"]

        alone = [await complete(p) for p in prompts]
        together = []
        for start in range(0, len(prompts), crowd):
            together += await asyncio.gather(*(complete(p) for p in prompts[start : start + crowd]))
    differ = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    return {"prompts": len(prompts), "tokens_each": max_tokens, "crowd": crowd, "differing_prompts": differ,
            "identical": not differ}


def decode_shapes(preset_name: str, layers: int, threads: int, ctx: int, rounds: int = 5) -> dict[str, float]:
    """Milliseconds per decode step for the batch shapes the engine can use, at 1 and at 16 busy requests."""
    import torch

    from pybitnet.synthetic import random_model

    torch.set_num_threads(threads)
    model = random_model(preset_name, seed=0, num_layers=layers)
    busy16 = torch.randint(32, ctx - 64, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    shapes = {
        "1 busy, 1 row (not invariant)": [300],
        "1 busy, 4 rows: sentinel + 2 padding (the engine)": [ctx - 1, 300, 0, 0],
        "1 busy, 17 rows: every slot padded": [ctx - 1, 300] + [0] * 15,
        "16 busy, 16 rows (not invariant)": busy16,
        "16 busy, 17 rows with the sentinel (the engine)": [ctx - 1] + busy16,
    }
    out = {}
    for name, lengths in shapes.items():
        cache = model.new_cache(len(lengths), ctx)
        tokens = torch.randint(3, model.config.vocab_size, (len(lengths),))
        best = float("inf")
        for _ in range(rounds):
            cache.lengths.copy_(torch.tensor(lengths))
            start = time.perf_counter()
            model.decode_step(tokens, cache)
            best = min(best, time.perf_counter() - start)
        out[name] = best * 1000
        print(f"{name:55s} {best * 1000:8.1f} ms", flush=True)
    return out


# -- reporting -------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    def ms(value):
        return "—" if value is None else f"{value * 1000:.0f}"

    lines = [f"Serving: {results['model']}, {results['threads']} threads, prompts {results['prompt_tokens']} tokens, "
             f"{results['max_tokens']} new tokens, {results['requests_per_level']} requests per level",
             "",
             "| engine | concurrency | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | e2e p50 / p99 ms | failed |",
             "|---|---|---|---|---|---|---|"]
    for engine, levels in results["engines"].items():
        for r in levels:
            lines.append(f"| {engine} | {r['concurrency']} | {r['output_tok_s']:.2f} | {ms(r['ttft_p50_s'])} / "
                         f"{ms(r['ttft_p99_s'])} | {ms(r['itl_p50_s'])} / {ms(r['itl_p99_s'])} | "
                         f"{ms(r['e2e_p50_s'])} / {ms(r['e2e_p99_s'])} | {r['failed']} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for engine, levels in results["engines"].items():
        ax.plot([r["concurrency"] for r in levels], [r["output_tok_s"] for r in levels], marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Serving throughput, {results['model']}, {results['threads']} threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bitnet-b1.58-2b-4t")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=None, help="per level [default: 2 x concurrency, at least 4]")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-min", type=int, default=32)
    parser.add_argument("--prompt-max", type=int, default=512)
    parser.add_argument("--engines", default="pybitnet,llama_cpp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--invariance", type=int, default=0, metavar="PROMPTS",
                        help="also check batch invariance on this many prompts (pybitnet only)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    parser.add_argument("--decode-shapes", action="store_true", help="time decode steps of the engine's shapes and exit")
    args = parser.parse_args()
    if args.decode_shapes:
        if os.environ.get("MKL_CBWR") is None:  # as the server runs; MKL reads it at its first call
            os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MKL_CBWR": "AUTO"})
        shapes = decode_shapes(args.preset, args.layers, args.threads, args.prompt_max + args.max_tokens + 16)
        if args.json:
            Path(args.json).write_text(json.dumps(shapes, indent=2))
        return
    levels = [int(c) for c in args.concurrency.split(",")]
    ctx = args.prompt_max + args.max_tokens + 16
    results = {"model": f"{args.preset} ({args.layers} layers, TQ2_0)", "threads": args.threads,
               "prompt_tokens": f"{args.prompt_min}-{args.prompt_max}", "max_tokens": args.max_tokens,
               "requests_per_level": args.requests or "2 x concurrency (>= 4)", "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        gguf, tokenizer = build_gguf(Path(tmp), args.preset, args.layers, args.seed)
        vocab = tokenizer.get_vocab_size()
        stop_ids = [vocab - 2, vocab - 1]  # <|end_of_text|>, <|eot_id|>
        for engine in args.engines.split(","):
            log = Path(tmp) / f"{engine}.log"
            process, url = start_server(engine, gguf, args.threads, ctx, max(levels), log)
            try:
                warm = make_prompts(tokenizer, 1, args.prompt_min, args.prompt_min, args.seed + 1)
                asyncio.run(run_level(url, warm, 1, 4, stop_ids))
                results["engines"][engine] = []
                for level in levels:
                    count = args.requests or max(4, 2 * level)
                    prompts = make_prompts(tokenizer, count, args.prompt_min, args.prompt_max, args.seed + level)
                    result = asyncio.run(run_level(url, prompts, level, args.max_tokens, stop_ids))
                    results["engines"][engine].append(result)
                    print(engine, json.dumps(result), flush=True)
                if engine == "pybitnet" and args.invariance:
                    prompts = make_prompts(tokenizer, args.invariance, args.prompt_min, args.prompt_max, args.seed + 7)
                    results["invariance"] = asyncio.run(invariance(url, prompts, args.max_tokens, stop_ids, max(levels)))
                    print("invariance", json.dumps(results["invariance"]), flush=True)
            finally:
                stop_server(process)
    table = markdown(results)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
