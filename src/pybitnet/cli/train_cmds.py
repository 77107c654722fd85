"""`pybitnet train CORPUS --preset NAME --out DIR`: quantization-aware training from a text file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import app
from .model_cmds import set_threads


@app.command()
def train(
    corpus: Path = typer.Argument(..., help="UTF-8 text file to train on (a held-out split is kept back)"),
    preset_name: str = typer.Option(..., "--preset", help="architecture preset, e.g. small or tiny"),
    out: Path = typer.Option(..., "--out", help="output directory: checkpoint, model files, tokenizer, log"),
    tokens: int = typer.Option(2_000_000, "--tokens", help="training tokens (steps = tokens / (batch * ctx))"),
    batch: int = typer.Option(16, "--batch", help="sequences per step"),
    ctx: int = typer.Option(256, "--ctx", help="tokens per sequence"),
    lr: float = typer.Option(2e-3, "--lr", help="peak learning rate (linear warmup, cosine decay to 10%)"),
    warmup: float = typer.Option(0.05, "--warmup", help="warmup as a fraction of the steps"),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay of the projections"),
    seed: int = typer.Option(0, "--seed", help="seeds the init and the batches: same seed, same model"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt (same options, tokenizer, corpus)"),
    force: bool = typer.Option(False, "--force", help="start a new run in an OUT that holds files (a run's files there are replaced)"),
    float_weights: bool = typer.Option(False, "--float", help="full-precision baseline: no ternarization, no int8"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="directory with tokenizer.json (default: train one)"),
    eval_every: int = typer.Option(100, "--eval-every", help="steps between validation losses"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", help="steps between checkpoints"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="stop after this many steps (resume later)"),
    chat_every: int = typer.Option(0, "--chat-every",
                                   help="every Nth pair of training lines as a chat exchange (user line, reply line, "
                                        "<|eot_id|>), so the model learns to end its turns; 0: none"),
    checkpoint_layers: bool = typer.Option(False, "--activation-checkpointing", help="recompute layers in backward"),
    compile_loss: bool = typer.Option(False, "--compile", help="torch.compile the training step's graphs (C++ compiler; ~10 s once)"),
    bf16_backward: bool = typer.Option(False, "--bf16-backward",
                                       help="backward GEMMs of the projections in bf16 (faster; ~0.4 percent noise on each gradient)"),
    gguf: bool = typer.Option(True, "--gguf/--no-gguf", help="also write OUT/model-i2_s.gguf"),
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="torch threads (default: all cores)"),
) -> None:
    """Train a BitNet b1.58 model (or its float baseline) and write it in HF packed and GGUF I2_S form."""
    from ..train.trainer import Run, TrainOptions

    set_threads(threads)
    options = TrainOptions(corpus=str(corpus), preset=preset_name, out=str(out), tokens=tokens, batch=batch, ctx=ctx,
                           lr=lr, warmup=warmup, weight_decay=weight_decay, seed=seed, float_weights=float_weights,
                           tokenizer=str(tokenizer) if tokenizer else None, eval_every=eval_every,
                           checkpoint_every=checkpoint_every, checkpoint_layers=checkpoint_layers,
                           compile=compile_loss, bf16_backward=bf16_backward,
                           stop_after=stop_after, chat_every=chat_every)
    run = Run(options, resume=resume, force=force)
    typer.echo(f"{run.config.num_layers} layers, {sum(p.numel() for p in run.model.parameters()) / 1e6:.2f}M "
               f"parameters, {run.train_ids.numel()} training tokens in the corpus, {options.steps()} steps")
    run.train()
    if not run.finished:
        typer.echo(f"stopped at step {run.step} of {options.steps()}; continue with --resume")
        return
    log = run.write_outputs()
    if gguf and not float_weights:
        write_gguf_beside(out)
    typer.echo(f"held-out loss {log['held_out_loss']:.4f}, perplexity {log['held_out_perplexity']:.2f}; "
               f"wrote {out}")


def write_gguf_beside(directory: Path, qtype: str = "i2_s") -> Path:
    """DIR/model-QTYPE.gguf from the HF files in DIR, with the tokenizer, written atomically."""
    from ..loaders import load_tokenizer, load_weights
    from ..loaders.gguf import write_gguf
    from ..train.data import atomic_write
    from ..tokenizer import gguf_tokenizer_metadata

    config, weights, _ = load_weights(directory)
    metadata = gguf_tokenizer_metadata(load_tokenizer(directory), config.vocab_size)
    target = directory / f"model-{qtype}.gguf"
    atomic_write(target, lambda tmp: write_gguf(tmp, config, weights, qtype, metadata))
    return target
