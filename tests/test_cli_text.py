"""`pybitnet generate` and `pybitnet chat`, run in-process through cli.main as a user would call them."""

from __future__ import annotations

import builtins
import re

import pytest

import pybitnet
from pybitnet import generate as generate_module
from pybitnet import load_tokenizer
from pybitnet.cli import text_cmds
from pybitnet.generate import generate
from pybitnet.sampling import SamplingParams


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, write_text_checkpoint):
    return write_text_checkpoint(tmp_path_factory.mktemp("cli-tiny"))


@pytest.fixture(scope="module")
def short_context_checkpoint(tmp_path_factory, write_text_checkpoint):
    return write_text_checkpoint(tmp_path_factory.mktemp("cli-short"), max_position_embeddings=24)


@pytest.fixture
def run_cli(cli):
    def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
        done = cli(*args, stdin=stdin)
        return done.code, done.out, done.err
    return run


def test_generate_greedy_prints_the_api_text_and_timing(checkpoint, run_cli):
    code, out, err = run_cli("generate", str(checkpoint), "Hello world", "-n", "10",
                             "--temperature", "0", "--no-stream", "--threads", "1")
    assert code == 0
    expected = generate(pybitnet.load(checkpoint), load_tokenizer(checkpoint), ["Hello world"], max_new_tokens=10)
    assert out == expected.texts[0] + "\n"
    assert re.search(r"\[prompt \d+ tokens · first token \d+ ms · \d+ tokens · [\d.]+ tok/s decode · stop: \w+\]", err)
    # Streaming prints the same text, piece by piece.
    code, streamed, _ = run_cli("generate", str(checkpoint), "Hello world", "-n", "10",
                                "--temperature", "0", "--threads", "1")
    assert code == 0 and streamed == out


def test_generate_same_seed_same_text(checkpoint, run_cli):
    args = ("generate", str(checkpoint), "The quick brown fox", "-n", "12", "--temperature", "1.0", "--threads", "1")
    first = run_cli(*args, "--seed", "5")[1]
    again = run_cli(*args, "--seed", "5")[1]
    other = run_cli(*args, "--seed", "6")[1]
    assert first == again and first != other
    expected = generate(pybitnet.load(checkpoint), load_tokenizer(checkpoint), ["The quick brown fox"], max_new_tokens=12,
                        sampling=SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05), seed=5)
    assert first == expected.texts[0] + "\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["", "-n", "4"], "error: the prompt is empty"),
        (["x", "--temperature", "-1"], "error: temperature must be >= 0"),
        (["x", "--top-p", "0"], "error: top_p must be in (0, 1]"),
        (["x", "--top-k", "-2"], "error: top_k must be an integer >= 0"),
        (["x", "--min-p", "1.5"], "error: min_p must be in [0, 1)"),
        (["x", "--repeat-penalty", "0"], "error: repetition_penalty must be > 0"),
        ([], "error: give either a prompt text or --tokens"),
        (["--tokens", "1,2", "--chat"], "error: --chat wraps a prompt text"),
    ],
)
def test_generate_bad_input_exits_1_with_a_message(checkpoint, run_cli, extra, message):
    code, out, err = run_cli("generate", str(checkpoint), *extra, "--threads", "1")
    assert code == 1 and message in err and "Traceback" not in err + out


@pytest.mark.parametrize("extra, option", [(["--max-tokens", "0"], "--max-tokens"), (["--threads", "0"], "--threads"),
                                           (["--threads", "100000"], "--threads"),
                                           (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed")])
def test_out_of_range_options_are_refused_before_loading(run_cli, extra, option):
    code, out, err = run_cli("generate", "synthetic:nonexistent-preset", "x", *extra)
    assert code == 2 and err.startswith(f"error: Invalid value for '{option}") and "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1


def test_model_without_tokenizer_or_missing_path(checkpoint, tmp_path, run_cli):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((checkpoint / name).read_bytes())
    code, _, err = run_cli("generate", str(tmp_path), "hello", "--threads", "1")
    assert code == 1 and f"error: no tokenizer in {tmp_path}" in err and "Traceback" not in err
    code, _, err = run_cli("chat", str(tmp_path), "--threads", "1", stdin="hi\n")
    assert code == 1 and "error: no tokenizer in" in err
    # Token ids still work on a model without a tokenizer: ids in, ids out.
    code, out, err = run_cli("generate", str(tmp_path), "--tokens", "1,2,3", "-n", "4", "--temperature", "0",
                             "--threads", "1")
    assert code == 0 and re.fullmatch(r"\d+(,\d+){3}\n", out)
    expected = generate(pybitnet.load(tmp_path), None, [[1, 2, 3]], max_new_tokens=4).token_ids[0]
    assert out == ",".join(map(str, expected)) + "\n"


def test_a_path_that_is_not_a_model_is_reported_as_such_not_as_a_tokenizer_problem(tmp_path, run_cli):
    not_a_model = tmp_path / "notamodel.txt"
    not_a_model.write_text("hello")
    for model in (not_a_model, tmp_path / "nope"):
        code, _, err = run_cli("generate", str(model), "hi", "--threads", "1")
        assert code == 1 and str(model) in err and "tokenizer" not in err, err


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_ctrl_c_keeps_the_text_generated_so_far(checkpoint, run_cli, monkeypatch, stream):
    args = ("generate", str(checkpoint), "Hello world", "--temperature", "0", "--threads", "1", stream)
    full = generate(pybitnet.load(checkpoint), load_tokenizer(checkpoint), ["Hello world"], max_new_tokens=8)
    real_sample, calls = generate_module.sample, []

    def interrupted_after_eight_tokens(*args, **kwargs):
        calls.append(1)
        if len(calls) > 8:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(generate_module, "sample", interrupted_after_eight_tokens)
    code, out, err = run_cli(*args, "-n", "50")
    assert code == 130 and err.strip().endswith("interrupted")
    assert out.rstrip("\n") == full.texts[0].rstrip("\n")  # the first eight tokens' text was kept and shown


def test_prompt_longer_than_context_errors_or_truncates(short_context_checkpoint, run_cli):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 4
    args = ("generate", str(short_context_checkpoint), long_prompt, "-n", "4", "--temperature", "0", "--threads", "1")
    code, _, err = run_cli(*args)
    assert code == 1 and "but the model's context is 24 tokens" in err and "--truncate" in err
    code, out, err = run_cli(*args, "--truncate")
    assert code == 0 and re.search(r"prompt truncated by \d+ tokens", err) and "[prompt 20 tokens" in err


def test_chat_keeps_history_resets_and_exits_on_eof(checkpoint, run_cli):
    code, out, err = run_cli("chat", str(checkpoint), "-n", "5", "--temperature", "0", "--stats",
                             "--threads", "1", stdin="hello there\n\nsecond message\n/reset\nhello there\n")
    assert code == 0 and "Traceback" not in err
    assert out.count("bitnet> ") == 3 and "[conversation cleared]" in err and err.rstrip().endswith("bye")
    prompt_sizes = [int(n) for n in re.findall(r"\[prompt (\d+) tokens", err)]
    # Turn 2 carries turn 1 (user + reply); after /reset the same first message gives the same prompt again.
    assert prompt_sizes[1] > prompt_sizes[0] + 5 and prompt_sizes[2] == prompt_sizes[0]
    replies = re.findall(r"bitnet> (.*)", out)
    assert replies[0] == replies[2]  # greedy: same history, same reply
    # Turn 2 prefills only what follows turn 1's K/V; a cleared conversation starts from nothing.
    reused = [int(n) for n in re.findall(r"(\d+) prompt tokens reused", err)]
    assert reused[0] == 0 and reused[1] > prompt_sizes[0] and reused[2] == 0


def test_chat_ctrl_c_stops_a_reply_then_exits_cleanly(checkpoint, run_cli, monkeypatch):
    lines = iter(["hello", "again"])

    def fake_input(prompt: str = "") -> str:
        print(prompt, end="")
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None  # Ctrl-C at the prompt

    real_generate = text_cmds.Conversation.generate
    prompts = []

    def first_reply_interrupted(self, **options):
        if not prompts:
            prompts.append(None)
            options["on_text"](0, "partial")
            raise KeyboardInterrupt  # Ctrl-C while the reply streams
        result = real_generate(self, **options)
        prompts.append(result.prompt_ids[0])
        return result

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(text_cmds.Conversation, "generate", first_reply_interrupted)
    code, out, err = run_cli("chat", str(checkpoint), "-n", "3", "--threads", "1")
    assert code == 0 and "bitnet> partial [interrupted]" in out and err.rstrip().endswith("bye")
    tokenizer = load_tokenizer(checkpoint)
    # The interrupted reply stays in the history as far as it was shown.
    assert tokenizer.decode(prompts[1], skip_special_tokens=False).startswith(
        tokenizer.apply_chat_template([{"role": "user", "content": "hello"}, {"role": "assistant", "content": "partial"}],
                                      add_generation_prompt=False))


def test_chat_drops_old_turns_to_fit_the_context(short_context_checkpoint, run_cli):
    long_message = "The quick brown fox jumps over the lazy dog. " * 4
    code, out, err = run_cli("chat", str(short_context_checkpoint), "-n", "4", "--temperature", "0",
                             "--stats", "--threads", "1", stdin=f"hi\nhello again\nand again\n{long_message}\nok\n")
    assert code == 0 and "Traceback" not in err
    assert "oldest messages dropped to fit the context of 24 tokens" in err
    assert "[that message is too long for the model's context of 24 tokens]" in err
    assert out.count("bitnet> ") == 4  # every message but the long one got a reply
    # Prompts leave room for the reply, unless the newest message alone does not (its reply then stops at the context).
    sizes = [int(n) for n in re.findall(r"\[prompt (\d+) tokens", err)]
    reasons = re.findall(r"stop: (\w+)", err)
    assert all(n + 4 <= 24 or (n < 24 and reason == "context") for n, reason in zip(sizes, reasons))


def test_chat_reply_budget_defaults_to_a_quarter_of_the_context(short_context_checkpoint, run_cli):
    code, out, err = run_cli("chat", str(short_context_checkpoint), "--temperature", "0", "--stats", "--threads", "1",
                             stdin="hi\n")
    assert code == 0 and "Traceback" not in err
    generated = int(re.search(r"· (\d+) tokens · ", err).group(1))
    reason = re.search(r"stop: (\w+)", err).group(1)
    # the model's context is 24 tokens: at most 6 per reply, all 6 unless the reply ended first
    assert generated <= 6 and (reason != "length" or generated == 6), err


def test_terminal_output_drops_control_characters_but_pipes_stay_exact():
    raw = "a\x1b[2Jb\rc\n\td\x7f\x00"
    assert text_cmds._for_terminal(raw, True) == "a[2Jbc\n\td"
    assert text_cmds._for_terminal(raw, False) == raw


@pytest.mark.parametrize("prompt", [("hello there",), ("--tokens", "1,2,3")])
def test_generate_on_a_synthetic_model_streams_as_it_samples(run_cli, monkeypatch, capsys, prompt):
    real_sample, samples = generate_module.sample, []
    shown_when_sampling = []  # characters on stdout each time a token is about to be sampled

    def counting_sample(*args, **kwargs):
        shown_when_sampling.append(len(capsys.readouterr().out))  # readouterr drains: sum gives the total so far
        samples.append(1)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(generate_module, "sample", counting_sample)
    code, out, err = run_cli("generate", "synthetic:tiny", *prompt, "-n", "12", "--temperature", "0",
                             "--threads", "1")
    assert code == 0, err
    assert len(samples) == 12 and sum(shown_when_sampling[:-1]) > 0  # output appeared before the last token


def test_score_text_on_a_synthetic_model_uses_its_tokenizer(run_cli):
    import json

    code, out, err = run_cli("score", "synthetic:tiny", "--text", "hello world", "--json", "--threads", "1")
    assert code == 0, err
    assert json.loads(out)["tokens"] == load_tokenizer("synthetic:tiny").encode("hello world")


def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(checkpoint, run_cli):
    code, out, err = run_cli("chat", str(checkpoint), "-n", "3", "--temperature", "0", "--threads", "1",
                             stdin="hello\n\udcff\udcfe\nagain\n")
    assert code == 0 and "[that line is not valid UTF-8 text" in err and out.count("bitnet> ") == 2


def test_generate_takes_the_output_head_mode(checkpoint, run_cli, monkeypatch):
    """--lm-head reaches pybitnet.load: the model runs the int8 head, its greedy text is the library's with
    lm_head="int8"; a bad mode names the choices."""
    from pybitnet.cli import model_spec

    heads = []
    real_load = model_spec.load
    monkeypatch.setattr(model_spec, "load", lambda *a, **k: heads.append(k.get("lm_head")) or real_load(*a, **k))
    code, out, err = run_cli("generate", str(checkpoint), "Hello world", "-n", "10", "--temperature", "0",
                             "--no-stream", "--threads", "1", "--lm-head", "int8")
    assert code == 0, err
    assert heads == ["int8"]
    model = pybitnet.load(checkpoint, lm_head="int8")
    expected = generate(model, load_tokenizer(checkpoint), ["Hello world"], max_new_tokens=10)
    assert out == expected.texts[0] + "\n"
    code, _, err = run_cli("generate", str(checkpoint), "Hello world", "-n", "2", "--lm-head", "q3_k")
    assert code == 1 and "choose one of: exact, int8, q8_0, q6_k, q5_k, q4_k, q4_0" in err
