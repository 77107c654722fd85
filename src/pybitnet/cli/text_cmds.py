"""Text commands: `pybitnet generate MODEL "prompt"` and `pybitnet chat MODEL` (interactive, streaming).

Generated text goes to stdout; timing and status lines go to stderr, so `pybitnet generate ... > out.txt` keeps
only the text. Bad input raises our InputError/CheckpointError, which cli.main prints as "error: ..." (exit 1).
"""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import InputError
from ..generate import GenerationResult, generate, stream
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer, load_tokenizer
from .app import app
from .model_cmds import DtypeOpt, ThreadsOpt, open_model, parse_token_list, set_threads

ModelArg = typer.Argument(..., help="HF directory or .gguf file with a tokenizer (or synthetic:PRESET with --tokens)")
MaxTokensOpt = typer.Option(None, "--max-tokens", "-n", help="most tokens to generate [default: 128; chat 512]")
TemperatureOpt = typer.Option(0.8, "--temperature", help="0 = greedy (deterministic)")
TopKOpt = typer.Option(40, "--top-k", help="keep the k most likely tokens (0 = off)")
TopPOpt = typer.Option(0.95, "--top-p", help="keep the most likely tokens up to this probability mass (1 = off)")
MinPOpt = typer.Option(0.05, "--min-p", help="drop tokens below this fraction of the top probability (0 = off)")
RepeatOpt = typer.Option(1.0, "--repeat-penalty", help="penalise tokens already seen (1 = off)")
SeedOpt = typer.Option(None, "--seed", help="random seed for sampling (same seed, same text)")


def _sampling(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repeat_penalty)


def _max_tokens(value: Optional[int], default: int) -> int:
    if value is None:
        return default
    if value < 1:
        raise InputError(f"--max-tokens must be >= 1, got {value}")
    return value


def _open_tokenizer(model: str) -> Tokenizer | None:
    """The model's tokenizer; None for synthetic models, which only take token ids."""
    if model.startswith("synthetic:"):
        return None
    return load_tokenizer(model)  # CheckpointError naming the path when there is none


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
def generate_cmd(
    model: str = ModelArg,
    prompt: Optional[str] = typer.Argument(None, help="the prompt text"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="prompt as comma-separated token ids instead of text"),
    max_tokens: Optional[int] = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatOpt,
    seed: Optional[int] = SeedOpt,
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop when this text appears (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat format"),
    do_stream: bool = typer.Option(True, "--stream/--no-stream", help="print text as it is generated"),
    truncate: bool = typer.Option(False, "--truncate", help="drop the front of a prompt longer than the context"),
    threads: Optional[int] = ThreadsOpt,
    dtype: str = DtypeOpt,
):
    """Generate text from a prompt; prints time to first token and decode tokens/s at the end."""
    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty)  # bad values fail before loading
    new_tokens = _max_tokens(max_tokens, 128)
    if (prompt is None) == (tokens is None):
        raise InputError('give either a prompt text or --tokens ids, e.g. pybitnet generate MODEL "Once upon a time"')
    if prompt is not None and not prompt.strip():
        raise InputError("the prompt is empty")
    set_threads(threads)
    tokenizer = _open_tokenizer(model)
    if tokenizer is None and (prompt is not None or chat or stop):
        raise InputError(f"{model} has no tokenizer: give the prompt as --tokens ids (and no --chat/--stop)")
    if tokens is not None:
        source = [parse_token_list(tokens)]
    elif chat:
        source = [tokenizer.encode_chat([{"role": "user", "content": prompt}])]
    else:
        source = [prompt]
    m = open_model(model, dtype)
    options = dict(max_new_tokens=new_tokens, sampling=params, seed=seed, stop_strings=stop or (), truncate=truncate,
                   stop_token_ids=tokenizer.stop_token_ids if tokenizer is not None else ())
    try:
        if tokenizer is not None and do_stream:
            text_stream = stream(m, tokenizer, source[0], **options)
            is_terminal = sys.stdout.isatty()
            for piece in text_stream:
                print(_for_terminal(piece, is_terminal), end="", flush=True)
            print()
            result = text_stream.result
        else:
            result = generate(m, tokenizer, source, **options)
            text = result.texts[0] if result.texts is not None else ",".join(map(str, result.token_ids[0]))
            print(_for_terminal(text, sys.stdout.isatty()))
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        raise typer.Exit(130) from None
    print(_status(result), file=sys.stderr)


@app.command("chat")
def chat_cmd(
    model: str = ModelArg,
    system: Optional[str] = typer.Option(None, "--system", help="a system message that opens the conversation"),
    max_tokens: Optional[int] = MaxTokensOpt,
    temperature: float = TemperatureOpt,
    top_k: int = TopKOpt,
    top_p: float = TopPOpt,
    min_p: float = MinPOpt,
    repeat_penalty: float = RepeatOpt,
    seed: Optional[int] = SeedOpt,
    show_stats: bool = typer.Option(False, "--stats", help="print tokens/s after each reply"),
    threads: Optional[int] = ThreadsOpt,
    dtype: str = DtypeOpt,
):
    """Chat with a model: streaming replies, multi-turn history. /reset clears it; /exit, Ctrl-D or Ctrl-C quits."""
    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty)
    new_tokens = _max_tokens(max_tokens, 512)
    set_threads(threads)
    tokenizer = _open_tokenizer(model)
    if tokenizer is None:
        raise InputError(f"{model} has no tokenizer; chat needs one")
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    try:
        m = open_model(model, dtype)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    print(f"pybitnet chat · {model} · /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = list(opening)
            print("[conversation cleared]", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        context = m.config.max_position_embeddings
        turns_before = len(history)
        # Keep room for a reply, but never more than half the context: old turns matter more than a huge budget.
        prompt_ids = _fit_history(tokenizer, history, len(opening), context, min(new_tokens, context // 2))
        if prompt_ids is not None and len(history) < turns_before:
            print(f"[{turns_before - len(history)} oldest messages dropped to fit the context of {context} tokens]",
                  file=sys.stderr)
        if prompt_ids is None:
            history.pop()
            print(f"[that message is too long for the model's context of {context} tokens]", file=sys.stderr)
            continue
        print("bitnet> ", end="", flush=True)
        text_stream = stream(m, tokenizer, prompt_ids, max_new_tokens=new_tokens, sampling=params,
                             seed=None if seed is None else seed + turn)
        pieces: list[str] = []
        try:
            for piece in text_stream:
                print(_for_terminal(piece, True), end="", flush=True)
                pieces.append(piece)
            print()
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            text_stream.close()
            print(" [interrupted]")
        history.append({"role": "assistant", "content": "".join(pieces)})
        if show_stats and text_stream.result is not None:
            print(_status(text_stream.result), file=sys.stderr)
        turn += 1
    print("bye", file=sys.stderr)


def _fit_history(tokenizer: Tokenizer, history: list[dict], keep: int, context: int, room: int) -> list[int] | None:
    """The prompt ids for `history`, dropping the oldest exchanges (after the first `keep` messages) until the
    prompt leaves `room` tokens (or at least one) of the context; None if the last message alone is too long."""
    while True:
        ids = tokenizer.encode_chat(history)
        if len(ids) + room <= context or (len(ids) < context and len(history) <= keep + 1):
            return ids
        if len(history) <= keep + 1:
            return None
        del history[keep]  # the oldest message after the system prompt
