"""Training step speed and memory: pybitnet's QAT step against transformers' BitNet training step.

Both train the same model (the same latent float weights, written once as a float checkpoint that
transformers loads in its online-quantization mode: ternary weights and int8 activations with
straight-through gradients), on the same batches, with the same AdamW. One step = forward, loss,
backward, optimizer step. The two alternate step by step in one process, so machine load hits both
alike; the figure is the median step time of each and their ratio. Peak memory is measured apart,
one side per child process (freed memory that one side's allocator keeps would hide the other's
peak): the rise of the peak RSS (VmHWM) over the RSS just before the first step, over three steps;
optimizer state and gradients count, as they do in training. transformers' quantizers run eagerly
there (the same ops), or the compiler's own memory would count as the step's.

    python benchmarks/train_bench.py --preset small --batch 8 --ctx 256 --threads 2 --steps 6
    python benchmarks/train_bench.py --preset tiny --batch 2 --ctx 32 --steps 2     # a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pybitnet.config import preset
from pybitnet.loaders.hf import hf_config_dict
from pybitnet.loaders.names import internal_to_hf
from pybitnet.train.qat import TrainableBitNet


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _measure(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def _peak_in_child(args: argparse.Namespace, side: str) -> float:
    """Peak RSS rise (MiB) of `side`'s training steps, measured in a process of its own."""
    command = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--ctx", str(args.ctx),
               "--threads", str(args.threads), "--memory-of", side]
    if args.layers:
        command += ["--layers", str(args.layers)]
    command += ["--checkpointing"] if args.checkpointing else []
    command += ["--bf16-backward"] if args.bf16_backward else []
    command += ["--compile"] if args.compile else []
    command += ["--eager-transformers"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _transformers_twin(model: TrainableBitNet, directory: Path, eager: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    raw = hf_config_dict(model.config, "autobitlinear", "float32")
    raw["quantization_config"]["quantization_mode"] = "online"
    (directory / "config.json").write_text(json.dumps(raw))
    save_file({internal_to_hf(k): v.contiguous() for k, v in model.latent_weights().items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype" if major >= 5 else "torch_dtype": torch.float32}
    if eager:
        with torch._dynamo.config.patch(disable=True):
            return AutoModelForCausalLM.from_pretrained(directory, **kw).train()
    return AutoModelForCausalLM.from_pretrained(directory, **kw).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="measured steps of each (after one warm-up step)")
    parser.add_argument("--checkpointing", action="store_true", help="our side with activation checkpointing")
    parser.add_argument("--bf16-backward", action="store_true", help="our side with bf16 backward GEMMs")
    parser.add_argument("--compile", action="store_true", help="our side with TrainableBitNet(compile=True)")
    parser.add_argument("--eager-transformers", action="store_true",
                        help="run transformers' torch.compile'd quantizers eagerly (default: as shipped, compiled)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--memory-of", choices=("pybitnet", "transformers"), default=None,
                        help="(internal) run only this side's steps and print its peak RSS rise in MiB")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    if args.layers:
        config = config.replace(num_layers=args.layers)
    ours = TrainableBitNet(config, seed=0, checkpoint_layers=args.checkpointing, compile=args.compile,
                           backward_dtype=torch.bfloat16 if args.bf16_backward else None)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = _transformers_twin(ours, Path(tmp), args.eager_transformers)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-3)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch, args.ctx + 1), generator=gen)
               for _ in range(args.steps + 1)]

    def our_step(tokens):
        def run():
            ours.loss(tokens[:, :-1], tokens[:, 1:]).backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
        return run

    def their_step(tokens):
        def run():
            theirs(input_ids=tokens, labels=tokens).loss.backward()
            opt_theirs.step()
            opt_theirs.zero_grad(set_to_none=True)
        return run

    import contextlib

    context = torch._dynamo.config.patch(disable=True) if args.eager_transformers else contextlib.nullcontext()
    if args.memory_of:
        make = our_step if args.memory_of == "pybitnet" else their_step
        before = _status_kib("VmRSS")
        with context:
            for tokens in batches[:3]:
                make(tokens)()
        print((_status_kib("VmHWM") - before) / 1024)
        return
    results = {"pybitnet": [], "transformers": []}
    with context:
        for i, tokens in enumerate(batches):  # step 0 warms up both (and compiles transformers' quantizers)
            for name, step in (("pybitnet", our_step(tokens)), ("transformers", their_step(tokens))):
                seconds = _measure(step)
                if i > 0:
                    results[name].append(seconds)
                print(f"step {i} {name:12s} {seconds:7.3f} s", flush=True)

    tokens_per_step = args.batch * args.ctx
    summary = {"preset": args.preset, "layers": config.num_layers, "batch": args.batch, "ctx": args.ctx,
               "threads": args.threads, "parameters": sum(p.numel() for p in ours.parameters()),
               "transformers_compiled": not args.eager_transformers, "activation_checkpointing": args.checkpointing,
               "pybitnet_compiled": args.compile, "pybitnet_backward_gemms": "bf16" if args.bf16_backward else "float32"}
    for name, rows in results.items():
        median = statistics.median(rows)
        summary[name] = {"median_step_s": median, "tokens_per_s": tokens_per_step / median,
                         "peak_rss_rise_mib": _peak_in_child(args, name)}
    summary["speedup"] = summary["transformers"]["median_step_s"] / summary["pybitnet"]["median_step_s"]
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
