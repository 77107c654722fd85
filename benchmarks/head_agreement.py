"""How far the lossy `lm_head="int8"` is from the exact head: top-1 agreement and KL per position.

Both heads see the same final hidden states (the int8 head changes nothing else), over every
position of a set of prompts. With a real checkpoint and its tokenizer, the prompts are text lines
(held-out text: a file given with --prompts, else a few built-in lines); with `synthetic:PRESET`
they are random token ids (a random model's logits say little about a trained one).

    python benchmarks/head_agreement.py MODEL [--prompts FILE] [--max-tokens 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

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


def agreement(model, batches: list[torch.Tensor]) -> dict:
    from pybitnet.head import LMHead

    int8_head = LMHead(model.lm_head.weight, "int8")
    agree, kl, positions = 0, 0.0, 0
    for tokens in batches:
        for _, hidden in model.hidden_states(tokens):  # (1, C, H) final-normed
            flat = hidden.reshape(-1, hidden.shape[-1])
            exact = model.lm_head(flat).double().log_softmax(-1)
            lossy = int8_head(flat).double().log_softmax(-1)
            agree += int((exact.argmax(-1) == lossy.argmax(-1)).sum())
            kl += float((exact.exp() * (exact - lossy)).sum())
            positions += flat.shape[0]
    return {"positions": positions, "top1_agreement": agree / positions, "mean_kl_nats": kl / positions}


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
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
