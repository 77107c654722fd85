"""The model commands as a user runs them: info, score, perplexity, bench; errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from pybitnet import synthetic
from pybitnet.evaluate import token_logprobs
from pybitnet.loaders.hf import save_hf
from pybitnet.config import preset


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pybitnet", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def _checkpoint(tmp_path):
    config = preset("tiny")
    save_hf(tmp_path, config, synthetic.random_weights(config, 0, embed_dtype=torch.float32), float_dtype=torch.float32)
    return tmp_path


def test_info(tmp_path):
    out = run("info", str(_checkpoint(tmp_path))).stdout
    assert "BitNetForCausalLM" in out and "relu2" in out and "4 / 2 / 32" in out


def test_score_prints_the_log_probs_of_forward_full(tmp_path):
    path = _checkpoint(tmp_path)
    out = json.loads(run("score", str(path), "--tokens", "1,5,9,200,3", "--json", "--dtype", "float64").stdout)
    import pybitnet

    expected = token_logprobs(pybitnet.load(path, dtype=torch.float64), [1, 5, 9, 200, 3])
    assert torch.allclose(torch.tensor(out["logprobs"], dtype=torch.float64), expected, rtol=1e-9)


def test_perplexity_command(tmp_path):
    path = _checkpoint(tmp_path)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(" ".join(str(i % 500) for i in range(0, 3000, 7)))
    out = run("perplexity", str(path), "--tokens-file", str(tokens), "--ctx", "128", "--stride", "64").stdout
    assert "perplexity" in out and "tokens/s" in out


def test_bench_writes_json_and_markdown(tmp_path):
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    run("bench", "--layers", "1", "--threads", "1", "--quick", "--sections", "full_vs_step,decode", "--json", str(out),
        "--markdown", str(md))
    results = json.loads(out.read_text())
    assert results["threads"] == 1 and results["layers"] == 1
    assert [r["T"] for r in results["full_vs_step"]] == [64, 128]
    assert all(r["speedup"] > 0 for r in results["full_vs_step"])
    assert "Full-sequence vs step-by-step" in md.read_text()


def test_errors_are_messages_not_tracebacks(tmp_path):
    for args, needle in [
        (("info", str(tmp_path / "missing")), "no such file"),
        (("score", "synthetic:tiny", "--tokens", "1,x"), "comma-separated integers"),
        (("score", "synthetic:tiny", "--tokens", "1,99999"), "token id out of range"),
        (("bench", "--sections", "nope"), "unknown --sections"),
    ]:
        proc = run(*args, check=False)
        assert proc.returncode != 0
        assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_score_and_perplexity_on_text(tmp_path):
    from test_tokenizer_helpers import write_tiny_checkpoint

    import pybitnet
    from pybitnet.tokenizer import load_tokenizer

    path = write_tiny_checkpoint(tmp_path / "m")
    text = "the quick brown fox jumps over the lazy dog"
    out = json.loads(run("score", str(path), "--text", text, "--json", "--dtype", "float64").stdout)
    ids = load_tokenizer(path).encode(text)
    assert out["tokens"] == ids
    expected = token_logprobs(pybitnet.load(path, dtype=torch.float64), ids)
    assert torch.allclose(torch.tensor(out["logprobs"], dtype=torch.float64), expected, rtol=1e-9)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((text + ". ") * 40)
    ppl = run("perplexity", str(path), str(corpus), "--ctx", "64", "--stride", "32").stdout
    assert "perplexity" in ppl
    proc = run("score", str(path), "--tokens", "1,2", "--text", "x", check=False)
    assert proc.returncode != 0 and "exactly one of" in proc.stderr
