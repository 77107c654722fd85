"""`pybitnet bench`: how fast the 2B-4T-shaped model runs on this machine, with progress and an ETA."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .app import app
from .options import BackendOpt, ThreadsOpt, set_threads
from .progress import StderrProgress

console = Console()


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(*columns, title=title, title_justify="left", min_width=len(title))  # titles stay on one line
    for column in table.columns[1:]:
        column.justify = "right"
    for row in rows:
        table.add_row(*row)
    return table


def print_results(results: dict) -> None:
    """The results as tables sized to the terminal."""
    machine = results["machine"]
    layers = results["layers"]
    console.print(f"[bold]{results['model']}[/bold] shape, {layers} layer{'' if layers == 1 else 's'}, random "
                  f"ternary weights · {results['threads']} threads · backend {results['backend']} · "
                  f"{machine['cpu']} ({machine['cpu_capability']})")
    if not machine["idle"]:
        console.print(f"[yellow]the machine was busy ({100 * (machine['cpu_busy_before'] or 0):.0f}% CPU) "
                      f"before the run: figures are low[/yellow]")
    if "scaling" in results:
        console.print(_table("prefill (forward_full, logits for the last position)", ["T", "tok/s", "ms/token"],
                             [[str(r["T"]), f"{r['full_tok_s']:.1f}", f"{r['full_ms_per_token']:.2f}"]
                              for r in results["scaling"]]))
    if "decode" in results:
        console.print(_table("decode (decode_step, batch 1)", ["context", "tok/s", "ms/token", "GB/s of weights"],
                             [[str(r["context"]), f"{r['tok_s']:.2f}", f"{r['ms_per_token']:.1f}",
                               f"{r.get('weight_gb_s', float('nan')):.1f}"]
                              for r in results["decode"]]))
    if "full_vs_step" in results:
        console.print(_table("full sequence vs step by step (all logits)", ["T", "full tok/s", "step tok/s", "speedup"],
                             [[str(r["T"]), f"{r['full_tok_s']:.1f}", f"{r['step_tok_s']:.2f}", f"{r['speedup']:.1f}x"]
                              for r in results["full_vs_step"]]))
    if "memory" in results:
        mem = results["memory"]
        peak = next(v for k, v in mem.items() if k.startswith("forward_full_T"))
        console.print(f"memory: model {mem['model_only_peak_rss'] / 2**30:.2f} GiB peak RSS, "
                      f"+{mem['forward_overhead'] / 2**30:.2f} GiB for a long prefill ({peak / 2**30:.2f} GiB)")
    if "gemm_peak" in results:
        gemm = results["gemm_peak"]
        line = f"int8 GEMM peak (torch._int_mm {gemm['shape']}): {gemm['gop_s']:.0f} GOP/s"
        if "fraction_of_peak" in gemm:
            line += f"; prefill at T={gemm['prefill_T']} reaches {100 * gemm['fraction_of_peak']:.0f}% of it"
        console.print(line)


@app.command()
def bench(layers: int = typer.Option(30, "--layers", min=1, help="layers of the 2B-4T-shaped model (30 = the real depth)"),
          full: bool = typer.Option(False, "--full", help="the whole suite (all T, memory): many minutes"),
          threads: Optional[int] = ThreadsOpt, backend: str = BackendOpt,
          json_path: Optional[Path] = typer.Option(None, "--json", help="write machine-readable results here"),
          markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="write a markdown report here"),
          plot_path: Optional[Path] = typer.Option(None, "--plot", help="write a PNG plot of ms/token vs T here (matplotlib)"),
          sections: Optional[str] = typer.Option(None, "--sections", help="comma-separated subset of: "
                                                 "full_vs_step, scaling, memory, decode, gemm_peak")):
    """Time a random model of the exact shape of microsoft/bitnet-b1.58-2B-4T, built on the spot (no download;
    not the small built-in model): prefill and decode speed, full sequence vs step by step.

    The default run takes about a minute or two on 2 cores; --full runs the whole suite."""
    from .. import bench as suite
    from .. import synthetic
    from ..errors import InputError
    from ..kernels import check_backend

    check_backend(backend)
    workload = dict(suite.FULL if full else suite.QUICK)
    if sections is not None:
        chosen = tuple(s.strip() for s in sections.split(",") if s.strip())
        unknown = [s for s in chosen if s not in suite.SECTIONS]
        if unknown or not chosen:
            raise InputError(f"unknown --sections {unknown or sections!r}; choose from {', '.join(suite.SECTIONS)}")
        workload["sections"] = chosen
    outputs = [str(p) if p else None for p in (json_path, markdown_path, plot_path)]
    suite.check_outputs(*outputs)  # before the work, not after it
    n = set_threads(threads)
    # on stderr (stdout holds the tables): the estimated seconds of the steps done, and within the model's
    # build the share of its weights drawn so far, so the bar and the time left move while it builds
    with StderrProgress(suite.estimated_seconds(layers, **workload), eta=True) as bar:
        done = [0.0, 0.0]  # the estimated seconds of the finished steps, and of the step under way

        def progress(message: str, seconds: float) -> None:
            if message.startswith("WARNING"):
                console.print(f"[yellow]{message}[/yellow]")
                return
            done[0] += done[1]
            done[1] = seconds
            bar.update(message, done[0])

        def drawn(count: int, total: int, part: str) -> None:  # the synthetic model's weights, as they are drawn
            bar.update(f"building the model: {part}", done[0] + done[1] * count / total)

        with synthetic.reporting_progress(drawn):
            results = suite.run_suite(layers=layers, threads=n, backend=backend, progress=progress, **workload)
    print_results(results)  # shown first: nothing that goes wrong while saving loses the numbers
    if not full:
        console.print("the whole suite (all T, memory): pybitnet bench --full")
    suite.save(results, *outputs)
