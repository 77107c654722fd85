"""The training run: AdamW with warmup + cosine decay, periodic validation, resumable checkpoints.

A run is a pure function of its options: the model init, the batches (data.batch_at) and the
learning rate (lr_at) depend on (seed, step) alone, and a checkpoint holds the model and optimizer
state, so stopping after any checkpoint and resuming gives the same weights as running straight.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from ..config import ModelConfig, preset
from ..errors import CheckpointError, InputError, PyBitNetError
from ..loaders.hf import save_hf
from . import data
from .qat import LatentLinear, TrainableBitNet

CHECKPOINT = "checkpoint.pt"
LOG = "training_log.json"
FLOAT_WEIGHTS = "float_model.safetensors"
# Every file a run writes in its out directory (--force replaces them; nothing else there is touched).
RUN_FILES = (CHECKPOINT, LOG, FLOAT_WEIGHTS, "config.json", "model.safetensors", "model-i2_s.gguf", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json")
CHECKPOINT_FORMAT = 2  # a dict of tensors and plain data, read back with torch.load(weights_only=True)


class TrainingDiverged(PyBitNetError):
    """The loss, a gradient or the weights stopped being finite numbers."""


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
    chat_every: int = 0  # every Nth pair of training lines as a chat exchange ending in <|eot_id|> (0: none)

    def steps(self) -> int:
        return max(1, self.tokens // (self.batch * self.ctx))

    def recipe(self) -> dict:
        """The options that must match for a resume to continue the same run."""
        fields = dataclasses.asdict(self)
        return {k: fields[k] for k in ("preset", "tokens", "batch", "ctx", "lr", "min_lr_ratio", "warmup",
                                       "weight_decay", "grad_clip", "seed", "float_weights", "chat_every")}


def lr_at(step: int, total: int, peak: float, min_ratio: float, warmup_fraction: float) -> float:
    """Linear warmup to `peak`, then cosine decay to peak * min_ratio at the last step."""
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _check(options: TrainOptions) -> None:
    """Every option a run takes, checked before it reads or writes anything."""
    for name in ("tokens", "batch", "ctx", "eval_every", "eval_windows", "checkpoint_every"):
        if getattr(options, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(options, name)}")
    if options.chat_every < 0:
        raise InputError(f"--chat-every must be 0 (no chat exchanges) or positive, got {options.chat_every}")
    if options.stop_after is not None and options.stop_after <= 0:
        raise InputError(f"--stop-after must be positive, got {options.stop_after}")
    # NaN fails every comparison, so each condition is written as what must hold
    if not (math.isfinite(options.lr) and options.lr > 0):
        raise InputError(f"--lr must be a positive number, got {options.lr}")
    if not 0 <= options.warmup <= 1:
        raise InputError(f"--warmup is a fraction of the steps, from 0 to 1, got {options.warmup}")
    if not 0 <= options.weight_decay <= 1:  # AdamW's decoupled decay: each step scales weights by 1 - lr * decay
        raise InputError(f"--weight-decay must be from 0 to 1, got {options.weight_decay}")
    if not 0 <= options.min_lr_ratio <= 1:
        raise InputError(f"min_lr_ratio must be from 0 to 1, got {options.min_lr_ratio}")
    if not (math.isfinite(options.grad_clip) and options.grad_clip >= 0):
        raise InputError(f"grad_clip must be a number >= 0 (0: no clipping), got {options.grad_clip}")
    preset(options.preset)  # an unknown preset names the known ones
    if options.tokenizer is not None and not _tokenizer_file(options.tokenizer).is_file():
        raise InputError(f"--tokenizer {options.tokenizer}: no tokenizer.json there")


def _tokenizer_file(source: str | Path) -> Path:
    return Path(source) / "tokenizer.json" if Path(source).is_dir() else Path(source)


def _check_out(out: Path, resume: bool, force: bool) -> None:
    """--out: a directory to continue (--resume), a new or empty one, or a run's directory to replace (--force)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a directory")
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise InputError(f"--resume: no checkpoint at {out / CHECKPOINT}")
    elif not force and out.is_dir() and any(out.iterdir()):
        what = "a training checkpoint" if (out / CHECKPOINT).exists() else "files"
        raise InputError(f"--out {out} already holds {what}: continue that run with --resume, replace it with --force, "
                         f"or choose another directory")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plain(value):
    """`value` as JSON data (tuples as lists): what a checkpoint stores and what it is compared with."""
    return json.loads(json.dumps(value))


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
    required = ("format", "recipe", "config", "tokenizer_sha256", "corpus_sha256", "model", "optimizer", "step",
                "history", "wall_seconds")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a training checkpoint of this pybitnet (no {', '.join(missing)})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state['format']!r}, this pybitnet reads {CHECKPOINT_FORMAT}")
    return state


def _differences(stored: dict, current: dict) -> str:
    keys = sorted(set(stored) | set(current))
    return ", ".join(f"{k} {stored.get(k)!r} in the checkpoint, {current.get(k)!r} now"
                     for k in keys if stored.get(k) != current.get(k))


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

    def __init__(self, options: TrainOptions, resume: bool = False, progress: bool = True, force: bool = False):
        # Everything is checked and read before the first write: a run that fails here leaves --out as it was.
        _check(options)
        self.options, self.progress, self.resume, self.force = options, progress, resume, force
        self.out = Path(options.out)
        _check_out(self.out, resume, force)
        state = read_checkpoint(self.out / CHECKPOINT) if resume else None
        train_text, held_out_text = data.read_corpus(options.corpus)
        self.corpus_sha256 = _sha256(train_text + "\0" + held_out_text)
        base = preset(options.preset)
        self.tokenizer, self.tokenizer_source = self._tokenizer(train_text, base.vocab_size, resume)
        self.tokenizer_sha256 = _sha256(self.tokenizer.to_str())
        vocab = self.tokenizer.get_vocab_size()
        # RoPE has no learned positions: a context beyond the preset's is trained, and the config says so.
        self.config: ModelConfig = base.replace(
            vocab_size=max(vocab, base.vocab_size), bos_token_id=self.tokenizer.token_to_id(data.BOS),
            eos_token_ids=(self.tokenizer.token_to_id(data.EOS), self.tokenizer.token_to_id(data.EOT)),
            max_position_embeddings=max(base.max_position_embeddings, options.ctx))
        if state is not None:
            self._check_resume(state)
        if options.chat_every and self.tokenizer.token_to_id(data.EOT) is None:
            raise InputError(f"--chat-every needs a tokenizer with {data.EOT}; {self.tokenizer_source} has none")
        self.train_ids = data.encode_with_chat(self.tokenizer, train_text, options.chat_every)
        if self.train_ids.numel() < options.ctx + 2:
            raise InputError(f"corpus {options.corpus}: the training split holds {self.train_ids.numel()} tokens, "
                             f"fewer than one window of --ctx {options.ctx} + 1")
        self.held_out = data.validation_windows(data.encode(self.tokenizer, held_out_text), options.ctx,
                                                options.eval_windows)
        self.model = TrainableBitNet(self.config, float_weights=options.float_weights, seed=options.seed,
                                     checkpoint_layers=options.checkpoint_layers, compile=options.compile,
                                     backward_dtype=torch.bfloat16 if options.bf16_backward else None)
        self.optimizer = _optimizer(self.model, options)
        self.step = 0
        self.history: dict[str, list] = {"train": [], "validation": []}
        self.wall_seconds = 0.0
        self.saved_step: int | None = None  # the step of the checkpoint on disk
        self._out_ready = False  # --out created and the tokenizer files written (at the first write)
        self._created: Path | None = None  # the directory that the first write created, if it did
        if state is not None:
            self._load_state(state)

    def _load_state(self, state: dict) -> None:
        path = self.out / CHECKPOINT
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            step, history, wall_seconds = int(state["step"]), state["history"], float(state["wall_seconds"])
            history = {"train": [list(x) for x in history["train"]], "validation": [list(x) for x in history["validation"]]}
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            first = " ".join(str(err).split())[:160]
            raise CheckpointError(f"{path}: its tensors do not fit the model of this run ({first})") from None
        self.step, self.history, self.wall_seconds = step, history, wall_seconds
        self.saved_step = step

    def _tokenizer(self, text: str, vocab_size: int, resume: bool) -> tuple[Tokenizer, str | None]:
        """(the tokenizer, the file it came from: None when trained here), read or trained, not yet written."""
        source = self.options.tokenizer
        if source is None and resume:
            source = str(self.out / "tokenizer.json")
            if not Path(source).is_file():
                raise InputError(f"--resume: no tokenizer.json in {self.out} (name the run's tokenizer with --tokenizer)")
        if source is None:
            return data.train_tokenizer(text, vocab_size), None
        path = _tokenizer_file(source)
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own exception type for a malformed file
            raise InputError(f"{path}: not a tokenizer.json that loads ({' '.join(str(err).split())[:160]})") from None
        if tokenizer.token_to_id(data.BOS) is None or tokenizer.token_to_id(data.EOS) is None:
            raise InputError(f"--tokenizer {source}: needs the tokens {data.BOS} and {data.EOS}")
        return tokenizer, str(path)

    # ------------------------------------------------------------------ checkpoints
    def _check_resume(self, state: dict) -> None:
        """A checkpoint continues this run only if it was written with the same recipe, model, tokenizer and corpus."""
        path = self.out / CHECKPOINT
        recipe = _plain(self.options.recipe())
        if _plain(state["recipe"]) != recipe:
            raise InputError(f"--resume: {path} was written by a run with different options "
                             f"({_differences(_plain(state['recipe']), recipe)})")
        if state["tokenizer_sha256"] != self.tokenizer_sha256:
            raise InputError(f"--resume: {path} was trained with a different tokenizer than {self.tokenizer_source}")
        if state["corpus_sha256"] != self.corpus_sha256:
            raise InputError(f"--resume: {path} was trained on a different corpus than {self.options.corpus} "
                             f"(its text has changed)")
        config = self._config_data()
        if _plain(state["config"]) != config:
            raise InputError(f"--resume: {path} holds a model of another shape "
                             f"({_differences(_plain(state['config']), config)})")

    def _config_data(self) -> dict:
        return _plain({k: v for k, v in dataclasses.asdict(self.config).items() if k != "extra"})

    def _prepare_out(self) -> None:
        """Before the first file of this run: --out created, a replaced run's files removed (--force), the
        tokenizer files written. If that fails, what it made is removed again."""
        if self._out_ready:
            return
        self._created = _first_missing(self.out)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.force and not self.resume:
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
            data.save_tokenizer(self.tokenizer, self.out)
        except BaseException:
            self._undo_first_write()
            raise
        self._out_ready = True

    def _undo_first_write(self) -> None:
        """The first write failed: --out as it was (a directory made here removed, files written here deleted)."""
        if self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
        elif not self.resume:  # an empty directory given, or one emptied of a run's files by --force
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
        self._out_ready = False

    def check_finite(self) -> None:
        """TrainingDiverged unless every weight and optimizer moment is a finite number."""
        tensors = [("weights", p) for p in self.model.parameters()]
        tensors += [("optimizer state", v) for s in self.optimizer.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
        for what, tensor in tensors:
            if not bool(torch.isfinite(tensor).all()):
                raise self._diverged(f"the {what} are no longer finite numbers")

    def _diverged(self, what: str) -> TrainingDiverged:
        kept = (f"the last checkpoint, step {self.saved_step}, is kept in {self.out / CHECKPOINT}"
                if self.saved_step is not None else "no checkpoint was written")
        return TrainingDiverged(f"training diverged at step {self.step + 1} (--lr {self.options.lr:g}): {what}; {kept}; "
                                f"try a lower --lr or a longer --warmup")

    def save_checkpoint(self) -> None:
        """OUT/checkpoint.pt, written atomically; never one with a non-finite number in it."""
        self.check_finite()
        first = not self._out_ready
        self._prepare_out()
        state = {"format": CHECKPOINT_FORMAT, "recipe": self.options.recipe(), "config": self._config_data(),
                 "tokenizer_sha256": self.tokenizer_sha256, "corpus_sha256": self.corpus_sha256,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "history": self.history, "wall_seconds": self.wall_seconds}
        try:
            data.atomic_write(self.out / CHECKPOINT, lambda tmp: _torch_save(state, tmp))
        except BaseException:
            if first:  # nothing of this run is on disk yet: leave --out as it was
                self._undo_first_write()
            raise
        self.saved_step = self.step

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
                loss = loss_tensor.item()
                if not math.isfinite(loss):
                    raise self._diverged(f"the training loss is {loss}")
                loss_tensor.backward()
                # max_norm inf leaves the gradients as they are (a factor of exactly 1) and gives their norm
                norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                            options.grad_clip if options.grad_clip > 0 else math.inf))
                if not math.isfinite(norm):
                    raise self._diverged(f"the gradient norm is {norm}")
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
                    if not math.isfinite(val):
                        raise self._diverged(f"the validation loss is {val}")
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
        self.check_finite()
        self._prepare_out()
        if self.model.float_weights:
            from safetensors.torch import save

            tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            data.atomic_write(self.out / FLOAT_WEIGHTS, lambda tmp: data.write_bytes(tmp, save(tensors)))
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
    """save_hf into a temporary directory beside `out`, then each file moved over its final name.
    A full disk is an OSError naming `out`, whichever writer ran into it."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".hf-") as tmp:
        try:
            save_hf(tmp, config, weights, float_dtype=torch.float16)
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(out)) if err.errno else err from None
        except Exception:
            if data.disk_full(out):  # safetensors reports an I/O error in its own exception type
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from None
            raise
        for file in Path(tmp).iterdir():
            file.chmod(0o644)
            file.replace(out / file.name)


def _torch_save(state: dict, tmp: str) -> None:
    with open(tmp, "wb") as f:  # a Python file: a full disk is an OSError (a path gives torch's RuntimeError)
        torch.save(state, f)


def _first_missing(path: Path) -> Path | None:
    """The topmost directory on the way to `path` that does not exist yet (what mkdir(parents=True) creates)."""
    missing = None
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing = directory
    return missing


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
