"""EleutherAI's lm-evaluation-harness on pybitnet models: the `pybitnet` model type.

    pip install "pybitnet[eval]"
    pybitnet eval MODEL --tasks hellaswag,arc_easy                       # our command (cli/eval_cmds.py)
    lm_eval --model pybitnet --model_args pretrained=MODEL --tasks ...   # lm-eval's, after `import pybitnet.harness`

Importing this module registers `PyBitNetLM` under the name `pybitnet`. It takes the model arguments
`pretrained=MODEL_SPEC` (any spec `pybitnet.load` takes; default the built-in model), `dtype=float32|float64`,
`batch_size=N` (rows per forward pass), `max_length=N` (the context lm-eval works in; default the model's
max_position_embeddings), `max_gen_toks=N` and `backend=NAME`.

What each request type does, and how it matches lm-eval's own `hf` backend on the same checkpoint:

- Tokenization is the `hf` backend's: the tokenizer's own special tokens (BOS for LLaMA-3 vocabularies) unless the
  text already starts with the BOS text; an empty context is the BOS token (`prefix_token_id`), and a context's
  trailing spaces move to the continuation (lm-eval's TemplateLM does both).
- `loglikelihood`: each (context, continuation) runs as `(context + continuation)[-(max_length + 1):][:-1]`, like
  `hf`, longest first, `batch_size` rows at a time, right-padded with an attention mask, and only the
  continuation's positions are projected to the vocabulary. Requests that share a context (the choices of a
  multiple-choice question) prefill that context once into a KV cache and run only their continuations after it;
  on the native float32 CPU path that gives the same bits as one full pass (docs/exactness.md).
- `loglikelihood_rolling`: lm-eval's rolling windows (`get_rolling_token_windows` + `make_disjoint_window`, window
  `max_length`, one token of context), as `hf` makes them, scored as loglikelihood requests; summed per document.
- `generate_until`: batched `pybitnet.generate.generate` on contexts left-truncated to `max_length - max_gen_toks`,
  greedy unless the task asks for `do_sample` (then `temperature`, `top_k`, `top_p`), stopped by the task's `until`
  strings, the EOS text and the tokenizer's stop tokens, and cut at the first stop string as `hf` cuts it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import Any

import torch

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    # lm-eval fills its model registry with its own backends on first use only while the registry is empty;
    # import them first, so registering `pybitnet` does not hide `hf`, `local-completions` and the others.
    import lm_eval.models  # noqa: F401
except ImportError as err:  # pragma: no cover - the message is the point
    from .errors import InputError

    raise InputError('the lm-evaluation-harness is not installed: pip install "pybitnet[eval]"') from err

from .errors import InputError
from .evaluate import PROJECT_ROWS
from .generate import generate
from .loaders import load
from .sampling import SamplingParams

try:  # where the MODEL-spec tokenizer loader lives (the loaders' entry point; tokenizer.py before it)
    from .loaders import load_tokenizer
except ImportError:  # pragma: no cover
    from .tokenizer import load_tokenizer  # type: ignore[attr-defined,no-redef]

MODEL_NAME = "pybitnet"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64}
# Continuation rows x positions projected at once after a shared context: bounds the (rows, T, V) logits.
SHARED_LOGIT_ROWS = 256


def _int_arg(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum or (isinstance(value, float) and value != number):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def _stop_list(until) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(s, str) for s in until):
        return list(until)
    raise InputError(f"generation kwarg 'until' must be a string or a list of strings, got {until!r}")


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text before each stop string in turn, as lm-eval's backends post-process a generation."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


@register_model(MODEL_NAME)
class PyBitNetLM(TemplateLM):
    """A pybitnet model as an lm-eval `LM`; `model=` / `tokenizer=` take objects already loaded. lm-eval's `device`
    and `max_batch_size` are accepted and not used: the model runs where pybitnet loads it."""

    backend = "causal"

    def __init__(self, pretrained: str = "builtin", dtype: str = "float32", batch_size: int | str | None = None,
                 max_length: int | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, backend: str = "auto",
                 model=None, tokenizer=None, max_batch_size: int | None = None, device: str | None = None,
                 **unused: Any) -> None:
        super().__init__()
        if unused:
            raise InputError(f"unknown model argument(s) for {MODEL_NAME}: {', '.join(sorted(unused))} "
                             f"(known: pretrained, dtype, batch_size, max_length, max_gen_toks, backend)")
        if str(dtype) not in DTYPES:
            raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
        self.pretrained = str(pretrained)
        self.model = model if model is not None else load(self.pretrained, dtype=DTYPES[str(dtype)], backend=backend)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.pretrained)
        if batch_size is None or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = DEFAULT_BATCH_SIZE  # no probing for memory: rows are cheap on a CPU
        self.batch_size_per_gpu = _int_arg("batch_size", batch_size)
        context = int(self.model.config.max_position_embeddings)
        self._max_length = context if max_length is None else _int_arg("max_length", max_length, 2)
        if self._max_length > context:
            raise InputError(f"max_length={self._max_length} is longer than the model's context "
                             f"({context} tokens, max_position_embeddings)")
        self._max_gen_toks = _int_arg("max_gen_toks", max_gen_toks)
        self._device = self.model.device
        self.dtype = str(dtype)

    # -- what lm-eval asks of a model --------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.source).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return self.tokenizer.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a few-shot chat. Without a generation prompt the last (assistant) message is left
        open, as transformers' continue_final_message leaves it: the text ends with its content."""
        text = self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)
        if not add_generation_prompt and chat_history:
            final = str(chat_history[-1]["content"]).strip()
            at = text.rfind(final) if final else -1
            if at >= 0:
                text = text[: at + len(final)]
        return text

    def get_model_info(self) -> dict:
        config = self.model.config
        return {"model_dtype": self.dtype, "model_layers": config.num_layers, "model_hidden_size": config.hidden_size,
                "model_vocab_size": config.vocab_size, "model_context": config.max_position_embeddings}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if add_special_tokens is None:  # the tokenizer's own template, unless the text already carries BOS
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        ids = self.tokenizer.encode(string, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- loglikelihood ---------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key or None, context ids, continuation ids) -> (log p(continuation), is greedy)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = []  # (request index, input ids, number of scored positions at its end)
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise InputError(f"request {i}: the continuation has no tokens")
            if not context:
                raise InputError(f"request {i}: the context has no tokens")
            if len(continuation) > self.max_length:
                raise InputError(f"request {i}: the continuation is {len(continuation)} tokens, longer than "
                                 f"max_length={self.max_length}")
            rows.append((i, list(context), list(continuation)))

        # Requests that share their whole (untruncated) context run it once; the rest one row each.
        groups: dict[tuple[int, ...], list] = defaultdict(list)
        for row in rows:
            _, context, continuation = row
            if len(context) + len(continuation) <= self.max_length + 1:
                groups[tuple(context)].append(row)
        shared = {key: members for key, members in groups.items() if len(members) > 1}
        shared_ids = {row[0] for members in shared.values() for row in members}
        single = [row for row in rows if row[0] not in shared_ids]

        progress = _progress(len(requests), "loglikelihood", disable_tqdm)
        single.sort(key=lambda r: (-(len(r[1]) + len(r[2])), r[1] + r[2]))  # longest first, as hf
        for start in range(0, len(single), self.batch_size):
            batch = single[start: start + self.batch_size]
            for (index, *_), answer in zip(batch, self._score_rows(batch)):
                self._answer(results, requests, index, answer)
            progress.update(len(batch))

        ordered = sorted(shared.items(), key=lambda kv: -(len(kv[0]) + max(len(r[2]) for r in kv[1])))
        pending: list[tuple[tuple[int, ...], list]] = []
        count = 0
        for key, members in ordered:
            for s in range(0, len(members), self.batch_size):  # a group larger than a batch: several groups
                part = members[s: s + self.batch_size]
                if pending and count + len(part) > self.batch_size:
                    self._run_shared(pending, results, requests)
                    progress.update(count)
                    pending, count = [], 0
                pending.append((key, part))
                count += len(part)
        if pending:
            self._run_shared(pending, results, requests)
            progress.update(count)
        progress.close()
        return results  # type: ignore[return-value]

    def _answer(self, results, requests, index: int, answer: tuple[float, bool]) -> None:
        results[index] = answer
        key = requests[index][0]
        if key is not None:  # rolling windows have no key: their sum is cached per document
            self.cache_hook.add_partial("loglikelihood", key, answer)

    def _score_rows(self, batch) -> list[tuple[float, bool]]:
        """Rows with no shared context: (context + continuation)[-(max_length+1):][:-1], right-padded, one pass."""
        inputs, targets = [], []
        for _, context, continuation in batch:
            whole = (context + continuation)[-(self.max_length + 1):]
            inputs.append(whole[:-1])
            targets.append(continuation)
        tokens, mask = _right_padded(inputs)
        wanted_rows, wanted_pos, wanted_tok = [], [], []
        for b, (ids, cont) in enumerate(zip(inputs, targets)):
            first = len(ids) - len(cont)
            wanted_rows += [b] * len(cont)
            wanted_pos += range(first, len(ids))
            wanted_tok += cont
        rows_t = torch.tensor(wanted_rows)
        pos_t = torch.tensor(wanted_pos)
        picked = []
        with torch.inference_mode():
            for start, hidden in self.model.hidden_states(tokens.to(self.device), mask.to(self.device)):
                inside = (pos_t >= start) & (pos_t < start + hidden.shape[1])
                if bool(inside.any()):
                    picked.append((inside.nonzero()[:, 0], hidden[rows_t[inside], pos_t[inside] - start]))
            order = torch.cat([where for where, _ in picked])
            hidden = torch.cat([h for _, h in picked])[order.argsort()]  # (N, H) in wanted order
            logp, greedy = self._targets(hidden, torch.tensor(wanted_tok))
        out, at = [], 0
        for cont in targets:
            n = len(cont)
            out.append((float(logp[at: at + n].sum()), bool(greedy[at: at + n].all())))
            at += n
        return out

    def _targets(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (N, H), targets (N,) -> log p(target) (N,) float64 and whether each target is the argmax."""
        logps, greedy = [], []
        for s in range(0, hidden.shape[0], PROJECT_ROWS):
            logits = self.model.project(hidden[s: s + PROJECT_ROWS])  # (n, V)
            want = targets[s: s + PROJECT_ROWS].to(logits.device)
            logps.append(logits.double().log_softmax(-1).gather(1, want[:, None])[:, 0].cpu())
            greedy.append((logits.argmax(-1) == want).cpu())
        return torch.cat(logps), torch.cat(greedy)

    def _run_shared(self, groups, results, requests) -> None:
        """Groups of requests with one context each: the contexts prefill a KV cache (one row per group), the
        last context position scores every member's first continuation token, and each member's remaining
        continuation runs after a copy of its group's row."""
        contexts = [list(key) for key, _ in groups]
        longest = max(len(key) + max(len(r[2]) for r in members) - 1 for key, members in groups)
        tokens, mask = _right_padded(contexts)
        with torch.inference_mode():
            cache = self.model.new_cache(len(groups), longest)
            last = self.model.prefill(tokens.to(self.device), cache, mask.to(self.device), logits="last")  # (G, V)
            first_logp = last.double().log_softmax(-1).cpu()
            first_greedy = last.argmax(-1).cpu()
            members = [(g, row) for g, (_, part) in enumerate(groups) for row in part]
            answers = {}
            for g, (index, _, continuation) in members:
                answers[index] = [float(first_logp[g, continuation[0]]), int(first_greedy[g]) == continuation[0]]
            # longest continuations first, so rows of one pass have similar widths and little padding is projected
            rest = sorted(((g, row) for g, row in members if len(row[2]) > 1), key=lambda m: -len(m[1][2]))
            start = 0
            while start < len(rest):
                width = len(rest[start][1][2]) - 1
                take = max(1, SHARED_LOGIT_ROWS // max(width, 1))
                part = rest[start: start + take]
                start += len(part)
                self._run_continuations(cache, part, answers, longest)
        for index, (logp, greedy) in answers.items():
            self._answer(results, requests, index, (logp, greedy))

    def _run_continuations(self, group_cache, part, answers, longest: int) -> None:
        inputs = [row[2][:-1] for _, row in part]
        tokens, mask = _right_padded(inputs)
        width = tokens.shape[1]
        # every row is padded to the part's widest continuation, after its own group's context
        held = int(group_cache.lengths[[g for g, _ in part]].max())
        cache = self.model.new_cache(len(part), max(longest, held + width))
        cache.copy_rows(group_cache, [g for g, _ in part], list(range(len(part))))
        logits = self.model.prefill(tokens.to(self.device), cache, mask.to(self.device),
                                    logits=torch.arange(width, device=self.device))  # (n, W, V)
        real = mask.bool().to(logits.device)  # (n, W): each row's own positions, not its padding
        targets = torch.tensor([t for _, (_, _, continuation) in part for t in continuation[1:]])
        picked = logits[real]  # (N, V) in row order, then position order
        logp = picked.double().log_softmax(-1).gather(1, targets[:, None].to(picked.device))[:, 0].cpu()
        greedy = (picked.argmax(-1).cpu() == targets)
        at = 0
        for _, (index, _, continuation) in part:
            n = len(continuation) - 1
            answers[index][0] += float(logp[at: at + n].sum())
            answers[index][1] = answers[index][1] and bool(greedy[at: at + n].all())
            at += n

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [[] for _ in requests]
        for n, (logp, _) in zip(owners, scores):
            totals[n].append(logp)
        out = []
        for req, parts in zip(requests, totals):
            total = math.fsum(parts)
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # -- generation ------------------------------------------------------------------------------------------------

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, SamplingParams]:
        kwargs = dict(gen_kwargs or {})
        stops = _stop_list(kwargs.pop("until", None))
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        if eos and eos not in stops:
            stops.append(eos)
        limit = self.max_gen_toks
        for alias in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
            if kwargs.get(alias) is not None:
                limit = _int_arg(alias, kwargs[alias])
                break
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        if not do_sample:
            temperature = 0.0
        elif temperature == 0.0:
            temperature = 1.0  # sampling asked for with no temperature: the distribution as it is
        sampling = SamplingParams(temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                                  top_p=float(kwargs.get("top_p") or 1.0))
        return stops, limit, sampling

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            by_kwargs[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        progress = _progress(len(requests), "generate_until", disable_tqdm)
        for indices in by_kwargs.values():
            gen_kwargs = requests[indices[0]].args[1]
            stops, limit, sampling = self._generation_settings(gen_kwargs)
            room = self.max_length - limit
            if room <= 0:
                raise InputError(f"max_gen_toks={limit} leaves no room for a context in max_length="
                                 f"{self.max_length}")
            encoded = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room) for i in indices}
            indices = sorted(indices, key=lambda i: (-len(encoded[i]), requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start: start + self.batch_size]
                seed = None if sampling.greedy else int(torch.randint(0, 2**62, (1,)))  # lm-eval seeds torch
                with torch.inference_mode():
                    out = generate(self.model, self.tokenizer, [encoded[i] for i in batch], max_new_tokens=limit,
                                   sampling=sampling, seed=seed, stop_strings=[s for s in stops if s])
                for i, ids in zip(batch, out.token_ids):
                    text = cut_at_stops(self.tok_decode(ids), stops)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]


def _right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) ids right-padded with 0 and the (B, T) attention mask."""
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, ids in enumerate(rows):
        tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[b, : len(ids)] = 1
    return tokens, mask


def _progress(total: int, what: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"pybitnet {what}", disable=disable or total == 0)
