"""What each output-head type costs, and how close its next-token distribution is to the F16 head's.

Head types (HEAD_TYPES: a name -> the table type the GGUF file stores and the lm_head mode it loads with):
f16 (the reference), bf16, q8_0, q6_k, q4_k (tables kept as stored, quant/ggml_blocks.QuantizedTable),
int8 (lm_head="int8" on the F16 file), q8_0+int8 / q6_k+int8 / q4_k+int8 (lm_head="int8" over the block
table: int8 activations against the blocks), and any type added to the table; a type this pybitnet cannot
write (loaders/gguf.EMBED_TYPES) is skipped with a note, and listed under "skipped" in the JSON.

Part A, cost, on the 2B-4T shape (--layers of it, random ternary weights, tied table):
  - one I2_S GGUF per table type, all from the same random weights, kept in --workdir and reused (delete
    them after a change to the GGUF writer or the quantizers);
  - in this one process every model is loaded, then --rounds rounds run; each round reads a buffer of
    --bandwidth-mib MiB (far larger than the L3 cache) with a few torch ops, then runs --steps decode
    steps of model A, of model B, ..., then times each head alone (`model.lm_head(h)`, one row). The best
    round of each counts, so every ratio is taken side by side;
  - per type: ms/step, tok/s, speed against f16, head ms, bytes one step reads (bench.weight_bytes_per_step),
    GB/s of the step and of the head alone (table bytes / head time), each as a fraction of the machine's
    read bandwidth: the fastest read of the run, whether a torch op's, a head's or a whole step's (a native
    kernel may read faster than any torch reduction), named in the output;
  - per type, in a fresh child process (benchmarks/load_rss.py): peak RSS (VmHWM) and the RSS left after
    loading and decoding.
Part B, quality: KL(f16 || type) per position (nats, mean) and top-1 agreement with the f16 head,
  (1) on the built-in model over the held-out split of its training corpus (docs/builtin-model.md: the
      King James text made by the `bible` program, or --corpus FILE; every 20th block of 40 lines is held
      out), 64 windows of 128 tokens as in its training log, with each head's mean NLL of the next token
      (the f16 head's is the documented held-out loss, 3.9158, when the text is right); the built-in f16
      table is quantized to each type (QuantizedTable.quantize, ggml's rounding) for the head only, the
      embedding lookups stay f16, so the figures are the head's alone;
  (2) on the random 2B-4T-shaped model on random token ids: the heads are the ones part A loaded, the
      hidden states come from its first --quality-layers layers (same seed: the same embedding and first
      layers), since only the head differs between the types. Its table is drawn in bf16, which f16 holds
      exactly but for the few values below f16's normal range: its bf16 row is ~0 by construction, and the
      built-in model's (a table trained and stored in f16) is the one that says what bf16 loses.

The full measurement, on an idle machine: about 8 minutes the first time (writing the files, mostly quantizing
the 128k x 2560 table to q6_k and q4_k with numpy), about 3 with the files in --workdir; ~10 GB of memory
(six 30-layer models at once and 2 GiB of read buffers):

    PYTHONPATH=src python benchmarks/head_types.py --layers 30 --threads 2 --rounds 5 \\
        --workdir /tmp/pybitnet-head-types --json benchmarks/results/head_types.json \\
        --markdown benchmarks/results/head_types.md
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

import pybitnet
from pybitnet import bench
from pybitnet.builtin import builtin_model_path
from pybitnet.config import preset
from pybitnet.head import LMHead
from pybitnet.loaders.gguf import EMBED_TYPES, write_gguf
from pybitnet.quant.ggml_blocks import KEPT_TYPES, QuantizedTable
from pybitnet.synthetic import random_model, random_weights
from pybitnet.train.data import encode, read_corpus, validation_windows

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from head_agreement import compare_heads, final_hidden  # noqa: E402
from load_rss import rss_after_decode  # noqa: E402

# head type -> (embedding / output type the GGUF file stores, lm_head mode); a new table type is one line here
HEAD_TYPES = {
    "f16": ("f16", "exact"),
    "bf16": ("bf16", "exact"),
    "q8_0": ("q8_0", "exact"),
    "q6_k": ("q6_k", "exact"),
    "q5_k": ("q5_k", "exact"),
    "q4_k": ("q4_k", "exact"),
    "q4_0": ("q4_0", "exact"),
    "int8": ("f16", "int8"),
    # lm_head="int8" over a block table: int8 activations against the file's blocks, no copy
    "q8_0+int8": ("q8_0", "int8"),
    "q6_k+int8": ("q6_k", "int8"),
    "q4_k+int8": ("q4_k", "int8"),
}
REFERENCE = "f16"
PRESET = "bitnet-b1.58-2b-4t"
# The built-in model's held-out figures in docs/builtin-model.md: 64 windows of 128 tokens.
BUILTIN_WINDOWS, BUILTIN_CTX = 64, 128
# docs/builtin-model.md's corpus: `bible -f "Gen1:1-Rev22:21" | sed 's/^[0-9A-Za-z]*[0-9]\+:[0-9]\+ //'`
BIBLE_RANGE = "Gen1:1-Rev22:21"
VERSE_LABEL = re.compile(r"^[0-9A-Za-z]*[0-9]+:[0-9]+ ")
RANDOM_SEQUENCES, RANDOM_TOKENS = 4, 128  # random-model quality: positions = 4 x 128
HEAD_REPEATS = 3  # head-alone calls per round; the best counts
READ_REPEATS = 3  # reads of the buffer per candidate per round


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def unsupported(name: str) -> str | None:
    """Why this pybitnet cannot write or hold head type `name`, or None when it can."""
    file_type, _ = HEAD_TYPES[name]
    if file_type not in EMBED_TYPES:
        return f"this pybitnet cannot write {file_type} tables (write_gguf takes {', '.join(EMBED_TYPES)})"
    ggml_name, dtype = EMBED_TYPES[file_type]
    if dtype is None and ggml_name not in KEPT_TYPES:
        return f"this pybitnet cannot keep {ggml_name} tables as stored (QuantizedTable holds {', '.join(KEPT_TYPES)})"
    return None


def head_from_table(table: torch.Tensor, name: str) -> LMHead:
    """The head of type `name` made from a float table (V, H): cast to a float type, or quantized with ggml's
    rounding to a block type (what writing and loading a GGUF file of that type gives)."""
    file_type, mode = HEAD_TYPES[name]
    ggml_name, dtype = EMBED_TYPES[file_type]
    weight = table.detach().to(dtype) if dtype is not None else QuantizedTable.quantize(table.detach(), ggml_name)
    return LMHead(weight, mode)


# ------------------------------------------------------------------------------------------------
# part A: cost


def gguf_path(workdir: Path, preset_name: str, layers: int, seed: int, file_type: str) -> Path:
    return workdir / f"{preset_name}-L{layers}-seed{seed}-i2_s-{file_type}.gguf"


def write_models(workdir: Path, preset_name: str, layers: int, seed: int, file_types: list[str]) -> dict[str, Path]:
    """One I2_S GGUF per table type, all from the same random weights; a file already in `workdir` is
    reused (write_gguf writes atomically, so a file there is whole)."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {t: gguf_path(workdir, preset_name, layers, seed, t) for t in file_types}
    missing = [t for t, p in paths.items() if not p.is_file()]
    if missing:
        config = preset(preset_name).replace(num_layers=layers)
        log(f"drawing the random weights ({preset_name}, {layers} layers)")
        weights = random_weights(config, seed)
        for t in missing:
            log(f"writing {paths[t].name}")
            write_gguf(paths[t], config, weights, "i2_s", embed_type=t)
    return paths


class ReadBandwidth:
    """Streaming reads of one buffer far larger than the L3 cache with torch ops, best of every call per op.

    Candidates differ a lot (on a 2-core Zen 4: int32 `x.sum()` widens to int64 on a slow path, 0.5 GB/s, so
    its int32-accumulator form is the one tried); the machine's figure is the fastest. A copy counts the
    bytes it reads only (it writes as many)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        source = torch.empty(nbytes, dtype=torch.uint8)
        source.view(torch.float32).fill_(1.0)  # written, so every page is real memory, not the shared zero page
        target = torch.empty_like(source).fill_(0)
        f32, i32, i64, i8 = (source.view(d) for d in (torch.float32, torch.int32, torch.int64, torch.int8))
        matrix, ones = f32.view(-1, 4096), torch.ones(4096)
        self.candidates = {
            "float32 x.sum()": lambda: f32.sum(),
            "int32 x.sum(dtype=int32)": lambda: i32.sum(dtype=torch.int32),
            "int64 x.sum()": lambda: i64.sum(),
            "float32 torch.max(x)": lambda: torch.max(f32),
            "int8 torch.max(x)": lambda: torch.max(i8),
            "float32 torch.dot(x, x)": lambda: torch.dot(f32, f32),
            "float32 torch.mv (BLAS GEMV)": lambda: torch.mv(matrix, ones),
            "uint8 y.copy_(x) (bytes read)": lambda: target.copy_(source),
        }
        self.best = dict.fromkeys(self.candidates, math.inf)

    def run_round(self, repeats: int = READ_REPEATS) -> None:
        for name, read in self.candidates.items():
            for _ in range(repeats):
                start = time.perf_counter()
                read()
                self.best[name] = min(self.best[name], time.perf_counter() - start)

    def gb_s(self) -> dict[str, float]:
        return {name: self.nbytes / seconds / 1e9 for name, seconds in self.best.items()}


class DecodeRunner:
    """One loaded model: decode rounds after a `context`-token prefill (each round from the same position),
    and its head alone on one row."""

    def __init__(self, model, context: int, steps: int, seed: int):
        self.model, self.steps, self.context = model, steps, context
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=g)
        self.tokens = torch.randint(0, model.config.vocab_size, (steps, 1), generator=g)
        self.cache = model.new_cache(1, context + steps + 1)
        model.prefill(prompt, self.cache)
        self.hidden = torch.nn.functional.rms_norm(torch.randn(1, model.config.hidden_size, generator=g),
                                                   (model.config.hidden_size,))
        self.best_step, self.best_head = math.inf, math.inf
        self.decode_round()  # warm-up: kernels, buffers, the first touch of every weight page
        self.head_call()
        self.best_step, self.best_head = math.inf, math.inf

    def decode_round(self) -> None:
        self.cache.lengths.fill_(self.context)
        start = time.perf_counter()
        for token in self.tokens:
            self.model.decode_step(token, self.cache)
        self.best_step = min(self.best_step, (time.perf_counter() - start) / self.steps)

    def head_call(self) -> None:
        start = time.perf_counter()
        self.model.lm_head(self.hidden)
        self.best_head = min(self.best_head, time.perf_counter() - start)


def measure_speed(models: dict, rounds: int, steps: int, context: int, bandwidth: ReadBandwidth, seed: int) -> dict:
    """Interleaved rounds over every model (and the buffer reads); per type the best round's figures."""
    runners = {name: DecodeRunner(model, context, steps, seed) for name, model in models.items()}
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}")
        bandwidth.run_round()
        for runner in runners.values():
            runner.decode_round()
        for runner in runners.values():
            for _ in range(HEAD_REPEATS):
                runner.head_call()
    reads = bandwidth.gb_s()
    rows = {}
    for name, runner in runners.items():
        step_bytes = bench.weight_bytes_per_step(runner.model)
        head_bytes = bench.head_weight_bytes(runner.model.lm_head)
        rows[name] = {"ms_per_step": 1e3 * runner.best_step, "tok_s": 1 / runner.best_step,
                      "head_ms": 1e3 * runner.best_head, "weight_bytes_per_step": step_bytes,
                      "head_table_bytes": head_bytes, "step_gb_s": step_bytes / runner.best_step / 1e9,
                      "head_gb_s": head_bytes / runner.best_head / 1e9}
    reference = rows.get(REFERENCE)
    # a native kernel may read faster than any torch op: the heads and the whole steps are candidates too
    candidates = {**reads, **{f"lm_head {name}": row["head_gb_s"] for name, row in rows.items()},
                  **{f"decode step {name}": row["step_gb_s"] for name, row in rows.items()}}
    fastest = max(candidates, key=candidates.get)
    best = candidates[fastest]
    for row in rows.values():
        row["speed_vs_f16"] = reference["ms_per_step"] / row["ms_per_step"] if reference else None
        row["head_speed_vs_f16"] = reference["head_ms"] / row["head_ms"] if reference else None
        row["step_fraction_of_read_bw"] = row["step_gb_s"] / best
        row["head_fraction_of_read_bw"] = row["head_gb_s"] / best
    read_bw = {"buffer_bytes": bandwidth.nbytes, "torch_reads_gb_s": reads, "gb_s": best, "fastest": fastest,
               "fastest_torch_read": max(reads, key=reads.get), "rounds": rounds, "repeats_per_round": READ_REPEATS}
    return {"rows": rows, "read_bandwidth": read_bw, "rounds": rounds, "steps": steps, "context": context,
            "head_repeats_per_round": HEAD_REPEATS}


# ------------------------------------------------------------------------------------------------
# part B: quality


def quality(model, heads: dict[str, LMHead], batches: list[torch.Tensor], targets: bool = False) -> dict:
    """compare_heads against the f16 head over the model's final hidden states of `batches`."""
    return compare_heads(heads[REFERENCE], heads, final_hidden(model, batches, targets=targets))


def kjv_corpus(workdir: Path) -> Path | None:
    """docs/builtin-model.md's corpus, made with the `bible` program into `workdir` (None without it)."""
    path = workdir / "kjv.txt"
    if path.is_file():
        return path
    if shutil.which("bible") is None:
        return None
    out = subprocess.run(["bible", "-f", BIBLE_RANGE], capture_output=True, text=True, check=True).stdout
    text = "".join(VERSE_LABEL.sub("", line) for line in out.splitlines(keepends=True))
    workdir.mkdir(parents=True, exist_ok=True)
    bench._write_atomically(str(path), bench._write_text(text))
    return path


def builtin_quality(types: list[str], corpus: Path | None, windows: int = BUILTIN_WINDOWS, ctx: int = BUILTIN_CTX) -> dict:
    """Each head type made from the built-in model's table, on `windows` x `ctx` tokens of the held-out
    split of `corpus` (its training corpus: text it never saw)."""
    if corpus is None:
        return {"skipped": "no corpus: the `bible` program is not installed and no --corpus was given "
                           "(docs/builtin-model.md says how the built-in model's corpus is made)"}
    model = pybitnet.load(builtin_model_path())
    tokenizer = Tokenizer.from_file(str(builtin_model_path() / "tokenizer.json"))
    _, held_out = read_corpus(corpus)
    ids = validation_windows(encode(tokenizer, held_out), ctx, windows)  # (N, ctx + 1)
    heads = {name: head_from_table(model.lm_head.weight, name) for name in types}
    rows = quality(model, heads, [ids], targets=True)
    return {"corpus": str(corpus), "corpus_sha256": hashlib.sha256(corpus.read_bytes()).hexdigest(),
            "held_out_windows": int(ids.shape[0]), "ctx": ctx,
            "table": f"{model.lm_head.weight.dtype} {list(model.lm_head.weight.shape)}", "rows": rows}


def random_quality(models: dict, preset_name: str, layers: int, seed: int) -> dict:
    """The loaded models' heads on the final hidden states of the first `layers` layers of the same random
    model, over random token ids."""
    model = random_model(preset_name, seed=seed, num_layers=layers)
    g = torch.Generator().manual_seed(seed + 1)
    # one batch: compare_heads runs the heads on COMPARE_ROWS rows at a time, and a block-table head dequantizes its
    # whole table once per call
    tokens = torch.randint(0, model.config.vocab_size, (RANDOM_SEQUENCES, RANDOM_TOKENS), generator=g)
    rows = quality(model, {name: m.lm_head for name, m in models.items()}, [tokens])
    return {"layers": layers, "sequences": RANDOM_SEQUENCES, "tokens": RANDOM_TOKENS, "rows": rows}


# ------------------------------------------------------------------------------------------------
# report


def commit() -> str | None:
    try:
        head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _cell(value, fmt: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value / scale, fmt)


def markdown(results: dict) -> str:
    m, speed, memory = results["machine"], results.get("speed", {}), results.get("memory", {})
    rows, read_bw = speed.get("rows", {}), speed.get("read_bandwidth")
    gib = 2**30
    lines = [f"### Head types (`{results['command']}`)", "",
             (f"{m['date']}, commit {results['commit']}; {m['cpu']} ({m['cores']} cores, {m['cpu_capability']}), "
             f"{results['config']['threads']} threads, torch {m['torch_version']}. Before the run: "
             f"{100 * (m.get('cpu_busy_before') or 0):.0f}% of the CPU busy, load average {m['load_average_before'][0]} "
             f"({'idle' if m['idle'] else 'NOT idle'}). `{results['config']['preset']}` shape, "
             f"{results['config']['layers']} layers, random ternary weights, I2_S; decode after "
             f"{speed.get('context')} tokens, {speed.get('steps')} steps per round, best of {speed.get('rounds')} "
             "interleaved rounds.")]
    if read_bw:
        lines[-1] += (f" Read bandwidth: {read_bw['gb_s']:.1f} GB/s ({read_bw['fastest']}; fastest torch read "
                      f"{read_bw['torch_reads_gb_s'][read_bw['fastest_torch_read']]:.1f} GB/s, "
                      f"{read_bw['fastest_torch_read']}, {read_bw['buffer_bytes'] / 2**20:.0f} MiB).")
    lines += ["", ("| head | table MB | MB read per step | ms/step | tok/s | speed vs f16 | head ms | step GB/s | head GB/s "
                   "| head / read bw | peak RSS GiB | RSS after GiB |"), "|---|" + "---:|" * 11]
    for name in results["types"]:
        r, mem = rows.get(name), memory.get(name, {})
        if r is None:
            continue
        lines.append(f"| {name} | {r['head_table_bytes'] / 1e6:.1f} | {r['weight_bytes_per_step'] / 1e6:.1f} | {r['ms_per_step']:.1f} | {r['tok_s']:.2f} "
                     f"| {_cell(r['speed_vs_f16'], '.2f')}× | {r['head_ms']:.2f} | {r['step_gb_s']:.1f} "
                     f"| {r['head_gb_s']:.1f} | {r['head_fraction_of_read_bw']:.2f} "
                     f"| {_cell(mem.get('peak_rss_bytes'), '.2f', gib)} | {_cell(mem.get('steady_rss_bytes'), '.2f', gib)} |")
    q = results.get("quality", {})
    builtin, rand = q.get("builtin", {}), q.get("random", {})
    on_builtin = (f"skipped: {builtin['skipped']}" if "skipped" in builtin else
                  f"{builtin.get('held_out_windows')} held-out windows of {builtin.get('ctx')} tokens, its table quantized to each type")
    lines += ["", (f"Against the f16 head: the built-in model ({on_builtin}) and the random model ({rand.get('sequences')} × "
                   f"{rand.get('tokens')} random tokens, hidden states of {rand.get('layers')} layers, part A's heads). "
                   "KL(f16 || head), mean per position, in nats; NLL: mean of the held-out next token."), "",
              "| head | built-in KL | built-in top-1 | built-in NLL | random KL | random top-1 |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in results["types"]:
        b, r = builtin.get("rows", {}).get(name, {}), rand.get("rows", {}).get(name, {})
        if not b and not r:
            continue
        lines.append(f"| {name} | {_cell(b.get('mean_kl_nats'), '.2e')} | {_cell(b.get('top1_agreement'), '.4f')} "
                     f"| {_cell(b.get('mean_nll_nats'), '.4f')} | {_cell(r.get('mean_kl_nats'), '.2e')} "
                     f"| {_cell(r.get('top1_agreement'), '.4f')} |")
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{name} ({reason})" for name, reason in results["skipped"].items()) + "."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(HEAD_TYPES),
                        help=f"comma-separated head types from: {', '.join(HEAD_TYPES)} (f16, the reference, is always run)")
    parser.add_argument("--preset", default=PRESET, help="model shape of part A and the random-model quality")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8, help="decode steps per model per round")
    parser.add_argument("--context", type=int, default=128, help="prompt tokens before the timed decode steps")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the buffer read for the bandwidth")
    parser.add_argument("--quality-layers", type=int, default=2, help="layers of the random model whose hidden states the heads see")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/pybitnet-head-types", help="GGUF files (and the corpus), reused when present")
    parser.add_argument("--corpus", help="the built-in model's training corpus (default: made with the `bible` program)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the markdown tables here")
    args = parser.parse_args(argv)
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in args.types if t not in HEAD_TYPES]
    if unknown:
        parser.error(f"unknown head types {', '.join(unknown)}; add them to HEAD_TYPES or choose from {', '.join(HEAD_TYPES)}")
    if REFERENCE not in args.types:
        args.types.insert(0, REFERENCE)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    bench.check_outputs(args.json, args.markdown)
    torch.set_num_threads(args.threads)
    log("checking the machine is idle")
    machine = bench.machine_info(args.threads)
    if not machine["idle"]:
        log(f"WARNING: {100 * (machine['cpu_busy_before'] or 0):.0f}% of the CPU busy before start: the machine is not idle")
    steal_start = bench._cpu_times()
    skipped = {t: reason for t in args.types if (reason := unsupported(t))}
    for name, reason in skipped.items():
        log(f"skipping {name}: {reason}")
    types = [t for t in args.types if t not in skipped]
    workdir = Path(args.workdir)
    results = {"benchmark": "head_types", "command": " ".join(["python", "benchmarks/head_types.py", *(argv or sys.argv[1:])]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
               "machine": machine, "types": args.types, "skipped": skipped,
               "config": {"preset": args.preset, "layers": args.layers, "threads": args.threads, "seed": args.seed,
                          "quality_layers": args.quality_layers, "lm_head_modes": {t: HEAD_TYPES[t][1] for t in types},
                          "file_types": {t: HEAD_TYPES[t][0] for t in types}}}

    wall = results["wall_s"] = {}  # per part, for the next run's estimate
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        wall[part] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    paths = write_models(workdir, args.preset, args.layers, args.seed, sorted({HEAD_TYPES[t][0] for t in types}))
    results["files"] = {t: str(paths[HEAD_TYPES[t][0]]) for t in types}
    lap("files")
    results["memory"] = {}
    for name in types:
        log(f"RSS of a fresh process: {name}")
        results["memory"][name] = rss_after_decode(str(paths[HEAD_TYPES[name][0]]), HEAD_TYPES[name][1], args.threads)
    lap("memory")

    log("loading every model")
    models = {name: pybitnet.load(paths[HEAD_TYPES[name][0]], lm_head=HEAD_TYPES[name][1]) for name in types}
    lap("load")
    bandwidth = ReadBandwidth(args.bandwidth_mib * 2**20)
    results["speed"] = measure_speed(models, args.rounds, args.steps, args.context, bandwidth, args.seed)
    del bandwidth
    lap("speed")
    log("quality on the random model")
    results["quality"] = {"random": random_quality(models, args.preset, args.quality_layers, args.seed)}
    del models
    lap("quality_random")
    log("quality on the built-in model")
    corpus = Path(args.corpus) if args.corpus else kjv_corpus(workdir)
    results["quality"]["builtin"] = builtin_quality(types, corpus)
    lap("quality_builtin")

    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()[:2]]
    steal_end = bench._cpu_times()
    if steal_start and steal_end and steal_end[1] > steal_start[1]:
        machine["steal_fraction"] = round((steal_end[0] - steal_start[0]) / (steal_end[1] - steal_start[1]), 4)
    table = markdown(results)
    if args.json:
        bench._write_atomically(args.json, bench._write_text(json.dumps(results, indent=2)))
    if args.markdown:
        bench._write_atomically(args.markdown, bench._write_text(table))
    print(table)
    return results


if __name__ == "__main__":
    main()
