"""Text commands: `pybitnet generate [MODEL] "prompt"` and `pybitnet chat [MODEL]` (interactive, streaming).
MODEL defaults to the built-in model.

Generated text goes to stdout as it decodes; timing and status lines go to stderr, so
`pybitnet generate ... > out.txt` keeps only the text. Ctrl-C stops generating and keeps what was printed.
Bad input raises our InputError/CheckpointError, which cli.main prints as "error: ..." (exit 1).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..constraints import compile_constraint
from ..errors import CheckpointError, InputError
from ..generate import GenerationResult, generate
from ..sampling import SamplingParams
from ..session import Conversation
from .app import INTERRUPTED_EXIT_CODE, app, one_line
from .model_spec import open_model, open_tokenizer, split_model
from .options import (MODEL_HELP, DtypeOpt, LmHeadOpt, ModelArg, ThreadsOpt, check_text, parse_token_ids, sampling_options,
                      set_threads)


# C0 control characters other than tab/newline (and DEL): a model can emit ESC sequences that would drive the
# user's terminal, or carriage returns that overwrite the line. Shown text drops them; piped output stays exact.
_TERMINAL_UNSAFE = {c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}


def _for_terminal(piece: str, is_terminal: bool) -> str:
    return piece.translate(_TERMINAL_UNSAFE) if is_terminal else piece


def _status(result: GenerationResult) -> str:
    decode = f"{result.decode_tokens_per_s:.1f} tok/s decode" if result.decode_tokens else "no decode steps"
    truncated = f" · prompt truncated by {result.truncated_tokens[0]} tokens" if result.truncated_tokens[0] else ""
    return (f"[prompt {len(result.prompt_ids[0])} tokens · first token {result.time_to_first_token_s * 1000:.0f} ms · "
            f"{result.generated_tokens} tokens · {decode} · stop: {result.finish_reasons[0]}{truncated}]")


@app.command("generate")
@sampling_options
def generate_cmd(
    arguments: Optional[list[str]] = typer.Argument(
        None, metavar="[MODEL] [PROMPT]", show_default=False,
        help=f"the prompt text, after an optional MODEL (default: builtin). MODEL is {MODEL_HELP}"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="prompt as comma-separated token ids instead of text"),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", min=1, help="most tokens to generate"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop when this text appears (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat format"),
    do_stream: bool = typer.Option(True, "--stream/--no-stream", help="print text as it is generated"),
    truncate: bool = typer.Option(False, "--truncate", help="drop the front of a prompt longer than the context"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", metavar="FILE",
                                               help="the output is JSON following the schema in FILE"),
    regex: Optional[str] = typer.Option(None, "--regex", metavar="R", help="the output matches the regular expression R"),
    grammar: Optional[Path] = typer.Option(None, "--grammar", metavar="FILE",
                                           help="the output follows the Lark (or GBNF) grammar in FILE"),
    threads: Optional[int] = ThreadsOpt,
    dtype: str = DtypeOpt,
    lm_head: str = LmHeadOpt,
    sampling: SamplingParams = None,
    seed: Optional[int] = None,
):
    """Generate text from a prompt; prints time to first token and decode tokens/s at the end."""
    arguments = list(arguments or [])
    if len(arguments) > 2:
        raise InputError(f"expected [MODEL] PROMPT, got {len(arguments)} arguments; quote a prompt of several words")
    # Two arguments are MODEL and PROMPT; one is the MODEL only when it names one (then --tokens is the prompt).
    model, rest = (arguments[0], arguments[1:]) if len(arguments) == 2 else split_model(arguments)
    prompt = rest[0] if rest else None
    if (prompt is None) == (tokens is None):
        raise InputError('give either a prompt text or --tokens ids, e.g. pybitnet generate "Once upon a time"')
    if prompt is not None and not check_text(prompt, "the prompt").strip():
        raise InputError("the prompt is empty")
    for stop_text in stop or ():
        check_text(stop_text, "--stop")
    if chat and prompt is None:
        raise InputError("--chat wraps a prompt text in the chat format; give the text, not --tokens")
    wanted = _constraint_source(json_schema, regex, grammar)
    prompt_ids = parse_token_ids(tokens) if tokens is not None else None
    set_threads(threads)
    m = open_model(model, dtype, lm_head=lm_head)  # a bad MODEL is reported as such, before any tokenizer question
    if prompt_ids is None or chat or stop or wanted is not None:
        tokenizer = open_tokenizer(model)  # CheckpointError naming the path when there is none
    else:
        try:
            tokenizer = open_tokenizer(model)  # to show the ids as text
        except CheckpointError as err:
            print(f"[generated ids shown as numbers: {one_line(str(err), 200)}]", file=sys.stderr)
            tokenizer = None  # ids in, ids out
    if chat:
        source = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    else:
        source = prompt_ids if prompt_ids is not None else prompt
    is_terminal = sys.stdout.isatty()
    shown: list[str] = []  # what the user has (or, with --no-stream, will have) seen

    def show(piece: str) -> None:
        shown.append(piece)
        if do_stream:
            print(_for_terminal(piece, is_terminal), end="", flush=True)

    def show_id(_row: int, token_id: int) -> None:
        show(f"{',' if shown else ''}{token_id}")

    options = dict(max_new_tokens=max_tokens, sampling=sampling, seed=seed, stop_strings=stop or (),
                   truncate=truncate, stop_token_ids=tokenizer.stop_token_ids if tokenizer is not None else ())
    if wanted is not None:
        options["constraint"] = compile_constraint(*wanted, tokenizer, vocab_size=int(m.config.vocab_size))
    try:
        if tokenizer is not None:
            result = generate(m, tokenizer, [source], on_text=lambda _row, piece: show(piece), **options)
        else:
            result = generate(m, None, [source], on_token=show_id, **options)
    except KeyboardInterrupt:
        if not do_stream:
            print(_for_terminal("".join(shown), is_terminal), end="")
        print(flush=True)  # what was shown stays, on a line of its own
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
    print("" if do_stream else _for_terminal("".join(shown), is_terminal))
    print(_status(result), file=sys.stderr)


def _constraint_source(json_schema: Path | None, regex: str | None, grammar: Path | None):
    """(kind, source) of --json-schema / --regex / --grammar, at most one of them; None without any."""
    given = [(k, v) for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise InputError("give at most one of --json-schema, --regex and --grammar")
    if not given:
        return None
    kind, value = given[0]
    if kind == "regex":
        return kind, value
    try:
        return kind, Path(value).read_text(encoding="utf-8")
    except OSError as err:
        raise InputError(f"cannot read {value}: {err.strerror}") from None


@app.command("chat")
@sampling_options
def chat_cmd(
    model: str = ModelArg,
    system: Optional[str] = typer.Option(None, "--system", help="a system message that opens the conversation"),
    max_tokens: Optional[int] = typer.Option(
        None, "--max-tokens", "-n", min=1, show_default="min(512, model context / 4)",
        help="most tokens per reply (a reply also ends at the model's end-of-turn token)"),
    show_stats: bool = typer.Option(False, "--stats", help="print tokens/s after each reply"),
    threads: Optional[int] = ThreadsOpt,
    dtype: str = DtypeOpt,
    lm_head: str = LmHeadOpt,
    sampling: SamplingParams = None,
    seed: Optional[int] = None,
):
    """Chat with a model: streaming replies, multi-turn history. /reset clears it; /exit, Ctrl-D or Ctrl-C quits."""
    if system is not None:
        check_text(system, "--system")
    set_threads(threads)
    m = open_model(model, dtype, lm_head=lm_head)
    tokenizer = open_tokenizer(model)  # CheckpointError naming the path when there is none: chat needs one
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    # The conversation keeps its K/V between turns: each turn prefills the new message and the template's framing.
    chat = Conversation(m, tokenizer, system=system)
    # A model that ends its turns stops well before this; the budget keeps room for the history in its context.
    new_tokens = max_tokens if max_tokens is not None else min(512, chat.session.max_len // 4)
    print(f"pybitnet chat · {model} · /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        except UnicodeDecodeError:  # stdin decoded strictly; otherwise bad bytes arrive as surrogates, checked below
            line = None
        try:
            check_text(line if line is not None else "\udcff", "that line")
        except InputError as err:
            print(f"[{err}]", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            chat = Conversation(m, tokenizer, system=system)
            print("[conversation cleared]", file=sys.stderr)
            continue
        chat.append("user", text)
        dropped = chat.dropped
        try:
            chat.prompt_ids(min(new_tokens, chat.session.max_len // 2))
        except InputError:
            chat.messages.pop()
            print(f"[that message is too long for the model's context of {chat.session.max_len} tokens]",
                  file=sys.stderr)
            continue
        if chat.dropped > dropped:
            print(f"[{chat.dropped - dropped} oldest messages dropped to fit the context of {chat.session.max_len} "
                  "tokens]", file=sys.stderr)
        print("bitnet> ", end="", flush=True)
        pieces: list[str] = []

        def show(_row: int, piece: str) -> None:
            print(_for_terminal(piece, True), end="", flush=True)
            pieces.append(piece)

        try:
            result = chat.generate(max_new_tokens=new_tokens, sampling=sampling, on_text=show,
                                   seed=None if seed is None else seed + turn)
            print()
            if show_stats:
                print(f"{_status(result)} · {chat.session.reused} prompt tokens reused", file=sys.stderr)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            print(" [interrupted]")
            chat.append("assistant", "".join(pieces))
        turn += 1
    print("bye", file=sys.stderr)
