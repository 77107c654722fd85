"""One model, several threads: every call gets the logits it would get alone (a server relies on it)."""

from __future__ import annotations

import threading

import torch

from pybitnet import preset, synthetic
from pybitnet.generate import generate


def _real_shaped_model():
    # A bf16 embedding and a vocabulary over one lm_head slice: the shape of every real checkpoint.
    config = preset("tiny").replace(vocab_size=2500)
    return synthetic.random_model(config, seed=3)


def _run_in_threads(work, count: int) -> list:
    results: list = [None] * count
    errors: list = []

    def target(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as err:  # surfaced below: a thread's failure must fail the test
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "a thread hung"
    return results


def test_forward_full_from_four_threads_matches_each_call_alone():
    model = _real_shaped_model()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2500, (1, 5 + 7 * i), generator=gen) for i in range(4)]
    alone = [model.forward_full(p) for p in prompts]

    def work(i: int) -> list[torch.Tensor]:
        return [model.forward_full(prompts[i]) for _ in range(6)]

    for i, outputs in enumerate(_run_in_threads(work, 4)):
        for out in outputs:
            assert torch.equal(out, alone[i]), f"thread {i}: logits differ from the same call alone"


def test_greedy_generation_from_four_threads_matches_alone():
    model = _real_shaped_model()
    prompts = [[1, 2, 3], [7, 8], [100, 200, 300, 400], [2499]]

    def greedy(i: int) -> list[int]:
        return generate(model, None, [prompts[i]], max_new_tokens=8).token_ids[0]

    alone = [greedy(i) for i in range(4)]
    assert _run_in_threads(greedy, 4) == alone


def test_rope_tables_grown_by_one_thread_serve_another():
    model = _real_shaped_model()
    base = model.rope.span(0, 4)[0].clone()

    def work(i: int) -> torch.Tensor:
        cos, sin = model.rope.span(1000 * (i + 1), 16)
        assert cos.shape == sin.shape == (16, model.config.head_dim)
        return model.rope.span(0, 4)[0]

    for first_rows in _run_in_threads(work, 4):
        assert torch.equal(first_rows, base)
