"""What the command line does with what goes wrong: one line on stderr, a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from pybitnet.cli import text_cmds


def test_ctrl_c_while_the_model_loads_exits_130_with_a_short_message(cli, monkeypatch):
    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(text_cmds, "open_model", interrupted_load)
    done = cli("generate", "synthetic:tiny", "--tokens", "1,2", "--threads", "1")
    assert done.code == 130 and done.err.strip() == "interrupted" and done.out == ""


def test_a_long_bad_input_gives_a_short_error(cli, tmp_path):
    junk = ",".join(["12", "x" * 60_000])
    done = cli("score", "synthetic:tiny", "--tokens", junk, "--threads", "1")
    assert done.code == 1 and done.err.startswith("error: --tokens must be comma-separated integers")
    assert len(done.err) < 500 and len(done.err.splitlines()) == 1


def test_a_bug_surfaces_as_one_line_naming_the_exception(cli, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(text_cmds, "open_model", broken)
    done = cli("generate", "synthetic:tiny", "--tokens", "1,2", "--threads", "1")
    assert done.code == 1 and len(done.err.splitlines()) == 1
    assert "internal error ZeroDivisionError: division by zero second line" in done.err
    monkeypatch.setenv("PYBITNET_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        cli("generate", "synthetic:tiny", "--tokens", "1,2", "--threads", "1")


@pytest.mark.parametrize("spec, message", [
    ("synthetic:tiny:x", "LAYERS in synthetic:PRESET[:LAYERS] must be an integer >= 1, got 'x'"),
    ("synthetic:tiny:0", "LAYERS in synthetic:PRESET[:LAYERS] must be an integer >= 1, got '0'"),
    ("synthetic:nope", "unknown preset 'nope'"),
])
def test_bad_synthetic_specs_name_the_problem(cli, spec, message):
    done = cli("info", spec)
    assert done.code == 1 and message in done.err and len(done.err.splitlines()) == 1


@pytest.mark.parametrize("tokens, message", [
    ("1,99999999999999999999999", "token id 99999999999999999999999 at item 1 is out of range"),
    ("1,-3", "token id -3 at item 1 is out of range"),
    ("[1, 2", "not a JSON list of token ids"),
    ('[1, "a"]', "item 1 is not an integer"),
    (" , ", "holds no token ids"),
])
def test_malformed_token_ids_are_refused(cli, tokens, message):
    done = cli("score", "synthetic:tiny", "--tokens", tokens, "--threads", "1")
    assert done.code == 1 and message in done.err and len(done.err.splitlines()) == 1


def test_bad_tokenizer_metadata_in_a_gguf_file_is_one_line(cli, tmp_path):
    from pybitnet import preset, synthetic
    from pybitnet.loaders.gguf import write_gguf

    config = preset("tiny").replace(num_layers=1)
    path = tmp_path / "bad-tokenizer.gguf"
    write_gguf(path, config, synthetic.random_weights(config, 0), "i2_s",
               {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1],
                "tokenizer.ggml.merges": []})
    for args in (("generate", str(path), "hello"), ("chat", str(path)), ("score", str(path), "--text", "hello")):
        done = cli(*args, "--threads", "1")
        assert done.code == 1 and str(path) in done.err and "tokenizer.ggml.token_type" in done.err, done.err
        assert len(done.err.splitlines()) == 1


def test_a_real_sigint_while_loading_exits_130_without_a_traceback():
    import subprocess
    import sys

    # The "load" sends this process SIGINT, as Ctrl-C in a terminal would, then waits to be interrupted.
    script = (
        "import os, signal, sys, time\n"
        "from pybitnet.cli import main, text_cmds\n"
        "def load(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(60)\n"
        "text_cmds.open_model = load\n"
        "sys.argv = ['pybitnet', 'generate', 'synthetic:tiny', 'hello', '--threads', '1']\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "interrupted" and proc.stdout == "", proc.stderr


@pytest.mark.parametrize("args", [
    ("generate", "synthetic:tiny", "\udcff\udcfeabc"),
    ("generate", "synthetic:tiny", "hello", "--stop", "\udcff"),
    ("score", "synthetic:tiny", "--text", "\udcff"),
    ("chat", "synthetic:tiny", "--system", "\udcff"),
])
def test_arguments_that_are_not_utf8_are_named(cli, args):
    # what Python makes of the bytes 0xff 0xfe in a command-line argument (surrogateescape)
    done = cli(*args, "--threads", "1")
    assert done.code == 1 and "is not valid UTF-8 text" in done.err and len(done.err.splitlines()) == 1, done.err
