"""The model commands as a user runs them: info and score; errors without tracebacks."""

from __future__ import annotations

import json
import re
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
    bits = float(re.search(r"ternary weights in memory\s*│\s*[\d.]+ MiB \(([\d.]+) bits each\)", out).group(1))
    assert 2.0 <= bits <= 8.0  # packed 2-bit codes (rows padded to the kernel's block) up to int8


def test_score_prints_the_log_probs_of_forward_full(tmp_path):
    path = _checkpoint(tmp_path)
    out = json.loads(run("score", str(path), "--tokens", "1,5,9,200,3", "--json", "--dtype", "float64").stdout)
    import pybitnet

    expected = token_logprobs(pybitnet.load(path, dtype=torch.float64), [1, 5, 9, 200, 3])
    assert torch.allclose(torch.tensor(out["logprobs"], dtype=torch.float64), expected, rtol=1e-9)


def test_errors_are_messages_not_tracebacks(tmp_path, cli):
    for args, needle in [
        (("info", str(tmp_path / "missing")), "no such file"),
        (("score", "synthetic:tiny", "--tokens", "1,x"), "comma-separated integers"),
        (("score", "synthetic:tiny", "--tokens", "1,99999"), "token id out of range"),
        (("bench", "--sections", "nope"), "unknown --sections"),
        (("info", "synthetic:tiny:x"), "LAYERS in synthetic:PRESET[:LAYERS] must be an integer"),
        (("score", "synthetic:tiny", "--tokens", "1," + "9" * 30), "out of range"),
    ]:
        done = cli(*args)
        assert done.code != 0
        assert needle in done.err and len(done.err.splitlines()) == 1, done.err


def test_score_text_goes_through_the_models_tokenizer(tmp_path, cli, write_text_checkpoint):
    import pybitnet
    from pybitnet import load_tokenizer

    path = write_text_checkpoint(tmp_path / "m")
    text = "the quick brown fox jumps over the lazy dog"
    out = json.loads(cli("score", str(path), "--text", text, "--json", "--dtype", "float64").out)
    ids = load_tokenizer(path).encode(text)
    assert out["tokens"] == ids
    expected = token_logprobs(pybitnet.load(path, dtype=torch.float64), ids)
    assert torch.allclose(torch.tensor(out["logprobs"], dtype=torch.float64), expected, rtol=1e-9)
    done = cli("score", str(path), "--tokens", "1,2", "--text", "x")
    assert done.code == 1 and "exactly one of" in done.err


def test_score_refuses_positions_past_the_context(tmp_path, cli, write_text_checkpoint):
    path = write_text_checkpoint(tmp_path / "m", max_position_embeddings=24)
    done = cli("score", str(path), "--tokens", ",".join(["5"] * 25))
    assert done.code == 1 and "25 tokens but the model's context is 24" in done.err
    done = cli("score", str(path), "--text", "the quick brown fox jumps over the lazy dog " * 4)
    assert done.code == 1 and "but the model's context is 24" in done.err
    done = cli("score", str(path), "--tokens", ",".join(["5"] * 24), "--json")
    assert done.code == 0 and len(json.loads(done.out)["logprobs"]) == 23
