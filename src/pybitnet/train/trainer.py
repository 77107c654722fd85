"""The training run: AdamW with warmup + cosine decay, periodic validation, resumable checkpoints.

A run is a pure function of its options: the model init, the batches (data.batch_at) and the
learning rate (lr_at) depend on (seed, step) alone, and a checkpoint holds the model and optimizer
state, so stopping after any checkpoint and resuming gives the same weights as running straight.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..config import ModelConfig, preset
from ..errors import CheckpointError, InputError
from ..loaders.hf import save_hf
from . import data
from .qat import LatentLinear, TrainableBitNet

CHECKPOINT = "checkpoint.pt"
LOG = "training_log.json"
FLOAT_WEIGHTS = "float_model.safetensors"


@dataclass
class TrainOptions:
    corpus: str
    preset: str
    out: str
    tokens: int = 2_000_000
    batch: int = 16
    ctx: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    float_weights: bool = False
    tokenizer: str | None = None  # a directory with tokenizer.json; trained on the corpus when None
    eval_every: int = 100
    eval_windows: int = 64
    checkpoint_every: int = 100
    checkpoint_layers: bool = False
    compile: bool = False  # torch.compile the loss (TrainableBitNet(compile=True))
    bf16_backward: bool = False  # the projections' backward GEMMs in bf16 (TrainableBitNet(backward_dtype=...))
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps: for tests and time limits

    def steps(self) -> int:
        return max(1, self.tokens // (self.batch * self.ctx))

    def recipe(self) -> dict:
        """The options that must match for a resume to continue the same run."""
        fields = dataclasses.asdict(self)
        return {k: fields[k] for k in ("preset", "tokens", "batch", "ctx", "lr", "min_lr_ratio", "warmup",
                                       "weight_decay", "grad_clip", "seed", "float_weights")}


def lr_at(step: int, total: int, peak: float, min_ratio: float, warmup_fraction: float) -> float:
    """Linear warmup to `peak`, then cosine decay to peak * min_ratio at the last step."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _check(options: TrainOptions) -> None:
    for name in ("tokens", "batch", "ctx", "eval_every", "eval_windows", "checkpoint_every"):
        if getattr(options, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(options, name)}")
    if not options.lr > 0:
        raise InputError(f"--lr must be positive, got {options.lr}")


def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, loaded weights-only: tensors and plain containers, nothing that runs code."""
    try:
        with warnings.catch_warnings():  # the refusal below says what is wrong, in one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # a truncated or empty file (EOFError), a zip that is not one, a pickle with code
        first = " ".join(str(err).split("\n")[0].split())[:160] or type(err).__name__
        raise CheckpointError(f"{path}: not a training checkpoint that loads as plain tensors and data; refusing it "
                              f"({type(err).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [key for key in ("recipe", "model", "optimizer", "step", "history", "wall_seconds") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint of this pybitnet (no {', '.join(missing)})")
    return state


def _optimizer(model: TrainableBitNet, options: TrainOptions) -> torch.optim.AdamW:
    """Weight decay on the projections' latent weights only (not on norms or embeddings)."""
    decayed = [m.weight for m in model.modules() if isinstance(m, LatentLinear)]
    ids = {id(p) for p in decayed}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": options.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=options.lr, betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def validation_loss(model: TrainableBitNet, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross-entropy over held-out windows (N, T + 1)."""
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start : start + batch]
        total += float(model.loss(chunk[:, :-1], chunk[:, 1:])) * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    return total / count


class Run:
    """One training run's state: tokenizer, data, model, optimizer, history."""

    def __init__(self, options: TrainOptions, resume: bool = False, progress: bool = True):
        _check(options)
        self.options, self.progress = options, progress
        self.out = Path(options.out)
        self.out.mkdir(parents=True, exist_ok=True)
        train_text, held_out_text = data.read_corpus(options.corpus)
        base = preset(options.preset)
        self.tokenizer = self._tokenizer(train_text, base.vocab_size, resume)
        vocab = self.tokenizer.get_vocab_size()
        self.config: ModelConfig = base.replace(
            vocab_size=max(vocab, base.vocab_size), bos_token_id=self.tokenizer.token_to_id(data.BOS),
            eos_token_ids=(self.tokenizer.token_to_id(data.EOS), self.tokenizer.token_to_id(data.EOT)))
        self.train_ids = data.encode(self.tokenizer, train_text)
        self.held_out = data.validation_windows(data.encode(self.tokenizer, held_out_text), options.ctx,
                                                options.eval_windows)
        self.model = TrainableBitNet(self.config, float_weights=options.float_weights, seed=options.seed,
                                     checkpoint_layers=options.checkpoint_layers, compile=options.compile,
                                     backward_dtype=torch.bfloat16 if options.bf16_backward else None)
        self.optimizer = _optimizer(self.model, options)
        self.step = 0
        self.history: dict[str, list] = {"train": [], "validation": []}
        self.wall_seconds = 0.0
        if resume:
            self._load_checkpoint()

    def _tokenizer(self, text: str, vocab_size: int, resume: bool) -> Tokenizer:
        source = self.options.tokenizer
        if source is None and resume and (self.out / "tokenizer.json").is_file():
            source = str(self.out)
        if source is not None:
            path = Path(source) / "tokenizer.json" if Path(source).is_dir() else Path(source)
            if not path.is_file():
                raise InputError(f"--tokenizer {source}: no tokenizer.json there")
            tokenizer = Tokenizer.from_file(str(path))
            if tokenizer.token_to_id(data.BOS) is None or tokenizer.token_to_id(data.EOS) is None:
                raise InputError(f"--tokenizer {source}: needs the tokens {data.BOS} and {data.EOS}")
        else:
            tokenizer = data.train_tokenizer(text, vocab_size)
        data.save_tokenizer(tokenizer, self.out)
        return tokenizer

    # ------------------------------------------------------------------ checkpoints
    def _load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise InputError(f"--resume: no checkpoint at {path}")
        state = read_checkpoint(path)
        if state["recipe"] != self.options.recipe():
            changed = sorted(k for k in state["recipe"] if state["recipe"][k] != self.options.recipe().get(k))
            raise InputError(f"--resume: {path} was written by a run with different options ({', '.join(changed)})")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history, self.wall_seconds = state["step"], state["history"], state["wall_seconds"]

    def save_checkpoint(self) -> None:
        state = {"recipe": self.options.recipe(), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "history": self.history,
                 "wall_seconds": self.wall_seconds}
        data.atomic_write(self.out / CHECKPOINT, lambda tmp: torch.save(state, tmp))

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        options, total = self.options, self.options.steps()
        stop = total if options.stop_after is None else min(total, self.step + options.stop_after)
        bar = _progress_bar(total, self.step, self.progress)
        tokens_per_step = options.batch * options.ctx
        started = first = time.perf_counter()
        first_step = self.step
        try:
            while self.step < stop:
                lr = lr_at(self.step, total, options.lr, options.min_lr_ratio, options.warmup)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                tokens, targets = data.batch_at(self.train_ids, self.step, options.batch, options.ctx, options.seed)
                loss_tensor = self.model.loss(tokens, targets)
                loss_tensor.backward()
                loss = loss_tensor.item()
                if options.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), options.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.history["train"].append([self.step, loss])
                elapsed = time.perf_counter() - first
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}",
                                    tok_s=f"{(self.step - first_step) * tokens_per_step / max(elapsed, 1e-9):.0f}")
                if self.step % options.eval_every == 0 or self.step == total:
                    val = validation_loss(self.model, self.held_out, options.batch)
                    self.history["validation"].append([self.step, val])
                    if bar is not None:
                        bar.write(f"step {self.step}: validation loss {val:.4f} (perplexity {math.exp(val):.2f})")
                if self.step % options.checkpoint_every == 0 or self.step == stop:
                    self.wall_seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()

    @property
    def finished(self) -> bool:
        return self.step >= self.options.steps()

    # ------------------------------------------------------------------ outputs
    def write_outputs(self) -> dict:
        """The trained model in the out directory: HF packed safetensors + tokenizer (BitNet), or the float
        weights (float baseline), and training_log.json. Returns the log."""
        if self.model.float_weights:
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            data.atomic_write(self.out / FLOAT_WEIGHTS, lambda tmp: save_file(tensors, tmp))
        else:
            config, weights = self.model.export(storage_dtype=torch.float16)
            write_hf_atomically(self.out, config, weights)
        log = self.summary()
        data.atomic_write_text(self.out / LOG, json.dumps(log, indent=2))
        return log

    def summary(self) -> dict:
        train = [loss for _, loss in self.history["train"][-50:]]
        val = self.history["validation"][-1][1] if self.history["validation"] else None
        return {
            "options": dataclasses.asdict(self.options),
            "config": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "extra"},
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "steps": self.step,
            "tokens_seen": self.step * self.options.batch * self.options.ctx,
            "train_tokens_in_corpus": int(self.train_ids.numel()),
            "held_out_tokens": int(self.held_out[:, 1:].numel()),
            "wall_seconds": round(self.wall_seconds, 1),
            "final_train_loss": sum(train) / len(train) if train else None,
            "held_out_loss": val,
            "held_out_perplexity": math.exp(val) if val is not None else None,
            "history": self.history,
        }


def write_hf_atomically(out: Path, config: ModelConfig, weights) -> None:
    """save_hf into a temporary directory beside `out`, then each file moved over its final name."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-") as tmp:
        save_hf(tmp, config, weights, float_dtype=torch.float16)
        for file in Path(tmp).iterdir():
            file.chmod(0o644)
            file.replace(out / file.name)


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
