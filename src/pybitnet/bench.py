"""The benchmark suite: full-sequence vs step-by-step, scaling in T, memory, decode, int8 GEMM peak.

Runs on a synthetic model with the exact bitnet-b1.58-2B-4T shape (random ternary weights, no
download). Every ratio is measured side by side in one run; the machine's load average is
recorded first, since one other busy process halves every figure on a 2-core machine.

QUICK is the default workload (a first answer within minutes on a small machine); FULL is the
whole suite behind BENCHMARKS.md. Each step reports its estimated cost, so a caller can show an ETA.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from . import runtime
from .config import preset
from .errors import InputError

PRESET = "bitnet-b1.58-2b-4t"
FULL_VS_STEP_T = (64, 128, 256, 512)
SCALING_T = (128, 256, 512, 1024, 2048, 4096)
DECODE_CONTEXTS = (128, 1024)
MEMORY_T = 2048
SECTIONS = ("full_vs_step", "scaling", "memory", "decode", "gemm_peak")
FULL = {"sections": SECTIONS, "full_vs_step_t": FULL_VS_STEP_T, "scaling_t": SCALING_T,
        "decode_contexts": DECODE_CONTEXTS}
# The real depth, the steps that answer "how fast on this machine": prefill, decode, full vs step.
QUICK = {"sections": ("full_vs_step", "scaling", "decode", "gemm_peak"), "full_vs_step_t": (64,),
         "scaling_t": (128, 512), "decode_contexts": (128,)}
Progress = Callable[[str, float], None]  # (what starts now, its estimated cost in seconds)

# Rough seconds on an idle 2-core AVX-512 machine, only to show progress and an ETA (not results).
_BUILD_S_PER_LAYER = 1.0  # drawing a layer's random weights (synthetic.random_weights)
_BUILD_S_EMBEDDING = 2.5  # drawing the 128k x 2560 embedding
_FULL_S_PER_TOKEN_LAYER = 0.25e-3  # forward_full
_STEP_S_PER_TOKEN_LAYER = 5e-3  # one decode step
_LOGITS_S_PER_TOKEN = 4e-3  # a position's logits over the 128k vocabulary


def _build_cost(layers: int) -> float:
    return _BUILD_S_EMBEDDING + layers * _BUILD_S_PER_LAYER


def _full_cost(seq: int, layers: int, all_logits: bool = False) -> float:
    return seq * (layers * _FULL_S_PER_TOKEN_LAYER + (_LOGITS_S_PER_TOKEN if all_logits else 0.0))


def _step_cost(steps: int, layers: int) -> float:
    return steps * (layers * _STEP_S_PER_TOKEN_LAYER + _LOGITS_S_PER_TOKEN)


def _step_repeats(seq: int) -> int:
    return 2 if seq <= 256 else 1


def estimated_seconds(layers: int = 30, sections=SECTIONS, full_vs_step_t=FULL_VS_STEP_T, scaling_t=SCALING_T,
                      decode_contexts=DECODE_CONTEXTS) -> float:
    """What run_suite's steps should take on an idle 2-core machine, roughly: the total for a progress bar."""
    total = 2.0  # the idle check before starting
    if any(s in sections for s in ("full_vs_step", "scaling", "decode")):
        total += _build_cost(layers)
    if "gemm_peak" in sections:
        total += 0.5
    if "full_vs_step" in sections:
        total += _full_cost(16, layers) + sum(
            2 * _full_cost(t, layers, True) + _step_repeats(t) * _step_cost(t, layers) for t in full_vs_step_t)
    if "scaling" in sections:
        total += sum((3 if t <= 1024 else 2) * _full_cost(t, layers) for t in scaling_t)
    if "decode" in sections:
        total += sum(_full_cost(c, layers) + _step_cost(3 * 8 + 1, layers) for c in decode_contexts)  # decode()'s rounds x steps + warm-up
    if "memory" in sections:
        total += 2 * _build_cost(layers) + _full_cost(MEMORY_T, layers)
    return total


def _report(progress: Progress | None, message: str, seconds: float) -> None:
    if progress:
        progress(message, seconds)


def best_seconds(fn: Callable[[], object], repeats: int = 1) -> float:
    """Best wall time of `repeats` runs, seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _tokens(seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed))


def ternary_ops_per_token(layers: int) -> int:
    """Integer multiply-adds (x2) of the seven BitLinears per token: the GEMM work of a prefill."""
    return 2 * preset(PRESET).replace(num_layers=layers).ternary_parameters()


def full_vs_step(model, seqs=FULL_VS_STEP_T, progress: Progress | None = None) -> list[dict]:
    rows = []
    vocab, layers = model.config.vocab_size, model.config.num_layers
    _report(progress, "warm-up", _full_cost(16, layers))
    model.forward_full(_tokens(16, vocab), logits="last")  # warm up kernels and buffers
    for seq in seqs:
        tokens = _tokens(seq, vocab, seq)
        _report(progress, f"full T={seq}", 2 * _full_cost(seq, layers, True))
        full = best_seconds(lambda: model.forward_full(tokens), repeats=2)
        _report(progress, f"step T={seq}", _step_repeats(seq) * _step_cost(seq, layers))
        step = best_seconds(lambda: model.forward_step_by_step(tokens), repeats=_step_repeats(seq))
        rows.append({"T": seq, "full_tok_s": seq / full, "step_tok_s": seq / step, "speedup": step / full})
    return rows


def scaling(model, seqs=SCALING_T, progress: Progress | None = None) -> list[dict]:
    rows = []
    vocab, layers = model.config.vocab_size, model.config.num_layers
    for seq in seqs:
        repeats = 3 if seq <= 1024 else 2
        _report(progress, f"scaling T={seq}", repeats * _full_cost(seq, layers))
        tokens = _tokens(seq, vocab, seq)
        elapsed = best_seconds(lambda: model.forward_full(tokens, logits="last"), repeats=repeats)
        rows.append({"T": seq, "full_ms_per_token": 1e3 * elapsed / seq, "full_tok_s": seq / elapsed})
    return rows


def decode(model, contexts=DECODE_CONTEXTS, steps: int = 8, rounds: int = 3, progress: Progress | None = None) -> list[dict]:
    """decode_step tokens/s after a prefill of `context` tokens: the best of `rounds` runs of `steps`
    steps (a shared VM stalls now and then for a few hundred ms; the best round is the machine's)."""
    rows = []
    vocab, layers = model.config.vocab_size, model.config.num_layers
    step_bytes = weight_bytes_per_step(model)
    for ctx in contexts:
        _report(progress, f"decode at context {ctx}", _full_cost(ctx, layers) + _step_cost(rounds * steps + 1, layers))
        cache = model.new_cache(1, ctx + rounds * steps + 1)
        model.prefill(_tokens(ctx, vocab, ctx), cache)
        token = torch.tensor([1])
        model.decode_step(token, cache)  # warm-up step
        best = min(best_seconds(lambda: [model.decode_step(token, cache) for _ in range(steps)]) for _ in range(rounds))
        rows.append({"context": ctx, "tok_s": steps / best, "ms_per_token": 1e3 * best / steps,
                     "weight_gb_s": step_bytes * steps / best / 1e9, "weight_bytes_per_step": step_bytes,
                     "steps": steps, "rounds": rounds})
    return rows


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every ternary projection as stored (2 bits per weight
    on CPU) and the output projection (its int8 copy for lm_head="int8")."""
    from .layers import BitLinear

    ternary = sum(m.ternary_weights.nbytes for m in model.modules() if isinstance(m, BitLinear))
    return ternary + head_weight_bytes(model.lm_head)


def head_weight_bytes(head) -> int:
    """Bytes of weights one call of an LMHead reads: its table as stored (ggml blocks for a quantized
    table, in either mode), or its int8 copy and scales for lm_head="int8" over a float table."""
    if head.mode == "int8" and hasattr(head, "int8_weight"):
        return head.int8_weight.nbytes + head.int8_scale.nbytes
    return head.weight.nbytes


def gemm_peak(rows: int = 512, repeats: int = 5) -> dict:
    """int8 GEMM GOP/s of torch._int_mm for the FFN gate/up shape [rows x 2560] x [2560 x 6912]."""
    c = preset(PRESET)
    a = torch.randint(-128, 128, (rows, c.hidden_size), dtype=torch.int8)
    w = torch.randint(-1, 2, (c.intermediate_size, c.hidden_size), dtype=torch.int8)
    torch._int_mm(a, w.t())
    elapsed = best_seconds(lambda: torch._int_mm(a, w.t()), repeats)
    return {"shape": [rows, c.hidden_size, c.intermediate_size], "gop_s": 2 * rows * c.hidden_size * c.intermediate_size / elapsed / 1e9}


# Peak RSS from VmHWM, the high-water mark of this process image: getrusage's ru_maxrss survives
# exec, so a child forked from a big parent would report the parent's size.
_MEMORY_SCRIPT = """
import torch, pybitnet
torch.set_num_threads({threads})
model = pybitnet.synthetic.random_model("{preset}", seed=0, num_layers={layers})
if {seq}:
    model.forward_full(torch.randint(0, model.config.vocab_size, (1, {seq})), logits="last")
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_rss(layers: int, seq: int, threads: int) -> int:
    """Peak RSS (bytes) of a fresh process that builds the model and, if seq, runs forward_full(logits="last")."""
    script = _MEMORY_SCRIPT.format(threads=threads, preset=PRESET, layers=layers, seq=seq)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def memory(layers: int, threads: int, progress: Progress | None = None) -> dict:
    _report(progress, "memory: model only", _build_cost(layers))
    model_only = peak_rss(layers, 0, threads)
    _report(progress, f"memory: forward_full T={MEMORY_T}", _build_cost(layers) + _full_cost(MEMORY_T, layers))
    with_forward = peak_rss(layers, MEMORY_T, threads)
    return {"model_only_peak_rss": model_only, f"forward_full_T{MEMORY_T}_peak_rss": with_forward,
            "forward_overhead": with_forward - model_only, "logits": "last"}


def _cpu_times() -> tuple[float, float] | None:
    """(steal, total) jiffies of all cores from /proc/stat: time the hypervisor gave to other guests."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return (fields[7] if len(fields) > 7 else 0.0), sum(fields)


def cpu_busy_fraction(seconds: float = 2.0) -> float | None:
    """Share of all cores busy over the next `seconds` (from /proc/stat), before we start any work.

    The load average trails by minutes, so it still counts a run that has just ended; this sample
    says whether something else is running *now*."""
    def sample():
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total
    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1.0)


def machine_info(threads: int) -> dict:
    busy = cpu_busy_fraction()
    load1, load5, _ = os.getloadavg()
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch_version": torch.__version__,
        "malloc_tuned": runtime.tune_allocator(),
        "python": platform.python_version(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_before": [round(load1, 2), round(load5, 2)],
        "cpu_busy_before": None if busy is None else round(busy, 3),
        "idle": busy < 0.1 if busy is not None else load1 < 0.5,
    }


def run_suite(layers: int = 30, threads: int | None = None, sections=SECTIONS, backend: str = "auto",
              progress: Progress | None = None, full_vs_step_t=FULL_VS_STEP_T, scaling_t=SCALING_T,
              decode_contexts=DECODE_CONTEXTS) -> dict:
    from .synthetic import random_model

    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    _report(progress, "checking the machine is idle", 2.0)
    info = machine_info(threads)
    steal_start = _cpu_times()
    results: dict = {"threads": threads, "torch_version": torch.__version__, "layers": layers, "backend": backend,
                     "model": PRESET, "machine": info}
    if not info["idle"]:
        _report(progress, f"WARNING: {100 * (info['cpu_busy_before'] or 0):.0f}% of the CPU busy before start "
                f"(load average {info['load_average_before'][0]}): the machine is not idle", 0.0)
    model = None
    if any(s in sections for s in ("full_vs_step", "scaling", "decode")):
        _report(progress, "building the model", _build_cost(layers))  # `pybitnet bench` shows it layer by layer
        model = random_model(PRESET, seed=0, num_layers=layers, backend=backend)
    if "gemm_peak" in sections:
        _report(progress, "int8 GEMM peak", 0.5)
        results["gemm_peak"] = gemm_peak()
    if "full_vs_step" in sections:
        results["full_vs_step"] = full_vs_step(model, full_vs_step_t, progress)
    if "scaling" in sections:
        results["scaling"] = scaling(model, scaling_t, progress)
    if "decode" in sections:
        results["decode"] = decode(model, decode_contexts, progress=progress)
    if "memory" in sections:
        del model
        results["memory"] = memory(layers, threads, progress)
    if "gemm_peak" in results and "scaling" in results:
        prefill = next((r for r in results["scaling"] if r["T"] == 512), results["scaling"][0])
        achieved = ternary_ops_per_token(layers) * prefill["full_tok_s"] / 1e9
        results["gemm_peak"].update({"prefill_T": prefill["T"], "prefill_gop_s": achieved,
                                     "fraction_of_peak": achieved / results["gemm_peak"]["gop_s"]})
    results["machine"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()[:2]]
    steal_end = _cpu_times()
    if steal_start and steal_end and steal_end[1] > steal_start[1]:
        results["machine"]["steal_fraction"] = round((steal_end[0] - steal_start[0]) / (steal_end[1] - steal_start[1]), 4)
    return results


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks", "",
        f"Model: `{results['model']}` shape, random ternary weights, {_layers(results['layers'])}, backend `{results['backend']}`.",
        f"Machine: {m['cpu']} ({m['cores']} cores, {m['cpu_capability']}), {results['threads']} torch threads, "
        f"torch {results['torch_version']}, Python {m['python']}. Date: {m['date']}. "
        f"Before the run: {100 * (m.get('cpu_busy_before') or 0):.0f}% of the CPU busy, load average "
        f"{m['load_average_before'][0]} ({'idle' if m['idle'] else 'NOT idle'}); CPU time stolen by the "
        f"hypervisor during the run: {100 * m.get('steal_fraction', 0):.1f}%. Timings are the best of 2-3 runs "
        f"(a single run for step-by-step at T=512).", "",
    ]
    if "full_vs_step" in results:
        lines += ["## Full-sequence vs step-by-step (all logits in both)", "",
                  "| T | full tok/s | step tok/s | speedup |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['T']} | {r['full_tok_s']:.1f} | {r['step_tok_s']:.2f} | {r['speedup']:.1f}× |" for r in results["full_vs_step"]]
        lines.append("")
    if "scaling" in results:
        lines += ["## Scaling in T (forward_full, logits for the last position)", "",
                  "| T | ms/token | tok/s |", "|---:|---:|---:|"]
        lines += [f"| {r['T']} | {r['full_ms_per_token']:.2f} | {r['full_tok_s']:.1f} |" for r in results["scaling"]]
        lines.append("")
    if "scaling_6_layers" in results:
        rows = results["scaling_6_layers"]
        by_t = {r["T"]: r["full_ms_per_token"] for r in rows["scaling"]}
        lines += [f"Six layers ({rows['note']}): " + ", ".join(f"T={t} {ms:.2f}" for t, ms in by_t.items())
                  + f" ms/token; T=4096 costs {by_t[4096] / by_t[256]:.2f}× T=256 per token.", ""]
    if "decode" in results:
        lines += ["## Decode (decode_step, batch 1)", "", "| context | tok/s | ms/token | weights read (GB/s) |",
                  "|---:|---:|---:|---:|"]
        lines += [f"| {r['context']} | {r['tok_s']:.2f} | {r['ms_per_token']:.1f} | {r.get('weight_gb_s', float('nan')):.1f} |"
                  for r in results["decode"]]
        lines.append("")
    if "memory" in results:
        mem = results["memory"]
        gib = 2**30
        lines += ["## Memory (peak RSS of separate processes)", "",
                  f"- model only: {mem['model_only_peak_rss'] / gib:.2f} GiB",
                  f"- model + forward_full at T={MEMORY_T} (logits last): {mem[f'forward_full_T{MEMORY_T}_peak_rss'] / gib:.2f} GiB "
                  f"(+{mem['forward_overhead'] / gib:.2f} GiB)", ""]
    if "gemm_peak" in results:
        g = results["gemm_peak"]
        lines += ["## int8 GEMM peak", "", f"- torch._int_mm {g['shape']}: {g['gop_s']:.0f} GOP/s"]
        if "prefill_gop_s" in g:
            lines.append(f"- prefill at T={g['prefill_T']}: {g['prefill_gop_s']:.0f} GOP/s of ternary GEMM work = "
                         f"{100 * g['fraction_of_peak']:.0f}% of that peak")
        lines.append("")
    if "vs_llama_cpp" in results:
        v = results["vs_llama_cpp"]
        lines += ["## vs llama.cpp (same random model as GGUF TQ2_0, same threads)", ""]
        if "skipped" in v:
            lines.append(f"- skipped: {v['skipped']}")
        else:
            lines += ["| | llama.cpp | pybitnet | ratio |", "|---|---:|---:|---:|",
                      f"| prompt processing, 512 tokens (tok/s) | {v['llama_pp512_tok_s']:.1f} | {v['pybitnet_pp512_tok_s']:.1f} | {v['pp512_ratio']:.2f}× |",
                      f"| generation, 32 tokens (tok/s) | {v['llama_tg32_tok_s']:.1f} | {v['pybitnet_tg32_tok_s']:.1f} | {v['tg32_ratio']:.2f}× |"]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if "scaling" in results:
        ax.plot([r["T"] for r in results["scaling"]], [r["full_ms_per_token"] for r in results["scaling"]], "o-",
                label="forward_full (logits last)")
    if "full_vs_step" in results:
        rows = results["full_vs_step"]
        ax.plot([r["T"] for r in rows], [1e3 / r["full_tok_s"] for r in rows], "s--", label="forward_full (all logits)")
        ax.plot([r["T"] for r in rows], [1e3 / r["step_tok_s"] for r in rows], "^-", label="forward_step_by_step")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ms per token")
    ax.set_title(f"{results['model']} shape, {_layers(results['layers'])}, {results['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layers(count: int) -> str:
    return f"{count} layer{'' if count == 1 else 's'}"


def check_outputs(json_path: str | None = None, markdown_path: str | None = None,
                  plot_path: str | None = None) -> None:
    """InputError now, before minutes of work, for an output that could not be written afterwards."""
    for path in (json_path, markdown_path, plot_path):
        if not path:
            continue
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise InputError(f"{path} is a directory; give a file name for the results")
        if not os.path.isdir(directory):
            raise InputError(f"cannot write {path}: no such directory {directory}")
        if not os.access(directory, os.W_OK):
            raise InputError(f"cannot write {path}: the directory {directory} is not writable")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("a plot needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """write(temp path) next to `path`, then rename over it: a reader never sees half a file."""
    directory, name = os.path.split(os.path.abspath(path))
    # the name keeps its extension: matplotlib picks the image format from it
    handle, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp" + os.path.splitext(name)[1], dir=directory)
    os.close(handle)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _write_text(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def save(results: dict, json_path: str | None = None, markdown_path: str | None = None, plot_path: str | None = None) -> None:
    """Write the results; the plot last, so that the numbers are safe if plotting fails."""
    if json_path:
        _write_atomically(json_path, _write_text(json.dumps(results, indent=2)))
    if markdown_path:
        _write_atomically(markdown_path, _write_text(markdown(results)))
    if plot_path:
        _write_atomically(plot_path, lambda temp: plot(results, temp))
