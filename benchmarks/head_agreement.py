"""How far the lossy `lm_head="int8"` is from the exact head: top-1 agreement and KL per position.

Both heads see the same final hidden states (the int8 head changes nothing else), over every
position of a set of prompts. With a real checkpoint and its tokenizer, the prompts are text lines
(held-out text: a file given with --prompts, else a few built-in lines); with `synthetic:PRESET`
they are random token ids (a random model's logits say little about a trained one). `compare_heads` holds
any set of heads to a reference head (benchmarks/head_types.py uses it for every head type).

    python benchmarks/head_agreement.py MODEL [--prompts FILE] [--max-tokens 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from pybitnet import bench
from pybitnet.head import LMHead

PROMPTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "In 1905 Albert Einstein published four papers that changed physics:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The recipe calls for two cups of flour, one egg, and",
    "Photosynthesis converts light energy into chemical energy stored in",
    "Once upon a time, in a village at the edge of a forest, there lived",
]


def _token_batches(model, source: str, prompts_file: str | None, max_tokens: int, seed: int) -> list[torch.Tensor]:
    if source.startswith("synthetic:"):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, model.config.vocab_size, (1, max_tokens), generator=g) for _ in range(4)]
    from pybitnet import load_tokenizer

    tokenizer = load_tokenizer(source)
    lines = PROMPTS if prompts_file is None else [l for l in open(prompts_file, encoding="utf-8").read().splitlines() if l.strip()]
    return [torch.tensor([tokenizer.encode(line)[:max_tokens]]) for line in lines]


def _load(source: str):
    import pybitnet

    if source.startswith("synthetic:"):
        _, preset, *layers = source.split(":")
        return pybitnet.synthetic.random_model(preset, seed=0, num_layers=int(layers[0]) if layers else None)
    return pybitnet.load(source)


# Rows of hidden states per head call: a (rows, vocabulary) float64 log-softmax of a 128k vocabulary is
# 1 MB per row, and several of them exist at once.
COMPARE_ROWS = 256


def final_hidden(model, batches: list[torch.Tensor], targets: bool = False):
    """Yield (final-normed hidden states (N, H), next tokens (N,) or None) over the positions of `batches`,
    chunk by chunk; with `targets`, each row's last position has no next token and is left out."""
    for tokens in batches:
        for start, hidden in model.hidden_states(tokens):  # (B, C, H)
            if not targets:
                yield hidden.reshape(-1, hidden.shape[-1]), None
                continue
            width = min(hidden.shape[1], tokens.shape[1] - 1 - start)  # positions with a next token
            if width > 0:
                yield (hidden[:, :width].reshape(-1, hidden.shape[-1]),
                       tokens[:, start + 1 : start + 1 + width].reshape(-1))


def compare_heads(reference, heads: dict, chunks) -> dict[str, dict]:
    """Each head's next-token distribution against `reference`'s on the same hidden states: per head,
    top-1 agreement and mean KL(reference || head) per position, in nats. `chunks` yields (hidden (N, H),
    next tokens (N,) or None); where the next tokens are given, each head's mean NLL of them too.

    The reference's log-probabilities are computed once per chunk and every head is held to them."""
    names = list(heads)
    agree = dict.fromkeys(names, 0)
    kl = dict.fromkeys(names, 0.0)
    nll = dict.fromkeys(names, 0.0)
    positions, scored = 0, 0
    for hidden, next_tokens in chunks:
        for start in range(0, hidden.shape[0], COMPARE_ROWS):
            flat = hidden[start : start + COMPARE_ROWS]
            exact = reference(flat).double().log_softmax(-1)  # (n, V)
            exact_top, exact_p = exact.argmax(-1), exact.exp()
            for name in names:
                other = heads[name](flat).double().log_softmax(-1)
                agree[name] += int((other.argmax(-1) == exact_top).sum())
                kl[name] += float((exact_p * (exact - other)).sum())
                if next_tokens is not None:
                    nll[name] -= float(other.gather(1, next_tokens[start : start + COMPARE_ROWS, None]).sum())
            positions += flat.shape[0]
            scored += flat.shape[0] if next_tokens is not None else 0
    result = {}
    for name in names:
        result[name] = {"positions": positions, "top1_agreement": agree[name] / positions,
                        "mean_kl_nats": kl[name] / positions}
        if scored:
            result[name]["mean_nll_nats"] = nll[name] / scored
    return result


def agreement(model, batches: list[torch.Tensor]) -> dict:
    """The int8 head against the model's exact head over every position of `batches`."""
    int8_head = LMHead(model.lm_head.weight, "int8")
    return compare_heads(model.lm_head, {"int8": int8_head}, final_hidden(model, batches))["int8"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="HF directory, .gguf file, or synthetic:PRESET[:LAYERS]")
    parser.add_argument("--prompts", help="text file, one prompt per line")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    model = _load(args.model)
    result = {"model": args.model, **agreement(model, _token_batches(model, args.model, args.prompts, args.max_tokens, args.seed))}
    print(f"int8 head vs exact: top-1 agreement {100 * result['top1_agreement']:.2f}% over {result['positions']} "
          f"positions, mean KL {result['mean_kl_nats']:.3e} nats")
    if args.json:
        bench._write_atomically(args.json, bench._write_text(json.dumps(result, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
