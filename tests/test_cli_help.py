"""The command line describes itself: version, defaults, the options each command really has."""

from __future__ import annotations

import re

import pytest

import pybitnet
from pybitnet.config import PRESETS

SAMPLING_OPTIONS = ("--temperature", "--top-k", "--top-p", "--min-p", "--repeat-penalty", "--seed")


@pytest.fixture
def help_of(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one option per line

    def run(*command: str) -> str:
        done = cli(*command, "--help")
        assert done.code == 0, done.err
        return done.out

    return run


def test_version(cli):
    done = cli("--version")
    assert done.code == 0 and done.out.strip() == f"pybitnet {pybitnet.__version__}"


def test_defaults_in_brackets_survive(help_of):
    assert re.search(r"--max-tokens\b.*default: 128", help_of("generate"))
    # chat's default depends on the model: a quarter of its context, at most 512
    chat = " ".join(help_of("chat").split())
    assert re.search(r"--max-tokens\b.*default: \(min\(512, model context / 4\)\)", chat)


def test_chat_offers_only_options_it_has(help_of):
    text = help_of("chat")
    assert "--tokens" not in text
    assert "--tokens" in help_of("generate")


def test_generate_and_chat_share_the_sampling_options(help_of):
    def option_lines(text):
        return {line.split()[0]: line.strip() for line in text.splitlines() if line.strip().startswith(SAMPLING_OPTIONS)}

    generate, chat = option_lines(help_of("generate")), option_lines(help_of("chat"))
    assert set(generate) == set(SAMPLING_OPTIONS) and generate == chat


def test_model_help_lists_the_presets(help_of):
    for command in ("info", "score", "generate", "chat", "convert"):
        text = " ".join(help_of(command).split())
        assert all(name in text for name in PRESETS), command


def test_no_command_prints_the_help(cli):
    done = cli()
    assert done.code == 0 and "Commands" in done.out + done.err and "error" not in done.err
