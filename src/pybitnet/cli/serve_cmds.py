"""`pybitnet serve MODEL`: the OpenAI-compatible HTTP server (see docs/server.md)."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from typing import Optional

import typer

from ..errors import CheckpointError, InputError
from .app import app
from .model_spec import SYNTHETIC_PREFIX, open_model, open_tokenizer
from .options import DtypeOpt, LmHeadOpt, ModelArg, ThreadsOpt, parse_dtype, set_threads


@app.command("serve")
def serve_cmd(
    model: str = ModelArg,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback by default)"),
    port: int = typer.Option(8000, "--port"),
    max_batch: int = typer.Option(16, "--max-batch", help="requests decoded together (KV cache rows)"),
    max_queue: int = typer.Option(64, "--max-queue", help="requests that may wait for a row; more get 503"),
    max_tokens_default: int = typer.Option(256, "--max-tokens-default", help="max_tokens when a request omits it"),
    max_request_bytes: int = typer.Option(4 << 20, "--max-request-bytes",
                                          help="larger request bodies are refused (413) unread"),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout",
                                        help="seconds a SIGTERM/Ctrl-C waits for accepted requests before stopping"),
    docs: bool = typer.Option(False, "--docs", help="serve /docs and /redoc (their pages load scripts from a CDN)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PYBITNET_API_KEY",
                                          help="require 'Authorization: Bearer KEY' (or env PYBITNET_API_KEY)"),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="positions per row [default: the model's context]"),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", help="prompt tokens prefilled between decode steps"),
    batch_invariant: bool = typer.Option(True, "--batch-invariant/--no-batch-invariant",
                                         help="a request's logits never depend on the rest of the batch"),
    name: Optional[str] = typer.Option(None, "--name", help="model id reported by /v1/models [default: MODEL]"),
    prefix_cache_mb: int = typer.Option(1024, "--prefix-cache-mb",
                                        help="memory for K/V of earlier prompts, reused by requests that repeat them"),
    no_prefix_cache: bool = typer.Option(False, "--no-prefix-cache", help="prefill every prompt in full"),
    prefix_cache_dir: Optional[str] = typer.Option(None, "--prefix-cache-dir",
                                                   help="load the prefix cache from here at start, save it at shutdown"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn's: critical, error, warning, info, debug"),
    use_ray: bool = typer.Option(False, "--ray", help="serve from replicas on Ray Serve (pip install \"pybitnet[ray]\")"),
    replicas: int = typer.Option(2, "--replicas", min=1, help="with --ray: replicas, each with its own model"),
    max_replicas: Optional[int] = typer.Option(None, "--max-replicas", min=1,
                                               help="with --ray: autoscale between --replicas and this many"),
    address: Optional[str] = typer.Option(None, "--address", help="with --ray: the cluster to join, e.g. auto "
                                                                  "(default: a local Ray instance)"),
    threads: Optional[int] = ThreadsOpt,
    dtype: str = DtypeOpt,
    lm_head: str = LmHeadOpt,
) -> None:
    """Serve MODEL over HTTP with the OpenAI API (completions, chat, models, tokenize, health, metrics)."""
    if batch_invariant and "MKL_CBWR" not in os.environ:
        # MKL's reproducible mode keeps attention independent of a row's place in the batch (see
        # pybitnet.serve.engine). MKL reads it at its first call, which importing torch code has already made,
        # so the command starts again in a process that has it from the beginning.
        os.execve(sys.executable, [sys.executable, "-m", "pybitnet", *sys.argv[1:]], {**os.environ, "MKL_CBWR": "AUTO"})
    from ..serve import ServerSettings, create_app, serve
    _check_exposure(host, api_key, max_request_bytes, drain_timeout)
    for option, value in (("--max-batch", max_batch), ("--prefill-chunk", prefill_chunk),
                          ("--max-tokens-default", max_tokens_default)):
        if value < 1:
            raise InputError(f"{option} must be >= 1, got {value}")
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise InputError(f"--log-level must be one of critical, error, warning, info, debug; got {log_level!r}")
    if prefix_cache_mb < 0:
        raise InputError(f"--prefix-cache-mb must be >= 0, got {prefix_cache_mb}")
    if prefix_cache_dir is not None and (no_prefix_cache or prefix_cache_mb == 0):
        raise InputError("--prefix-cache-dir needs the prefix cache (drop --no-prefix-cache, or give --prefix-cache-mb > 0)")
    if prefix_cache_dir is not None and os.path.exists(prefix_cache_dir) and not os.path.isdir(prefix_cache_dir):
        raise InputError(f"--prefix-cache-dir {prefix_cache_dir} exists and is not a directory")
    if max_queue < 0 or not 0 < port < 65536 or (ctx is not None and ctx < 2):
        raise InputError(f"need --max-queue >= 0, --port in 1..65535 and --ctx >= 2; got {max_queue}, {port}, {ctx}")
    set_threads(threads)

    def load():
        loaded = open_model(model, dtype, lm_head=lm_head)
        if model.startswith(SYNTHETIC_PREFIX):
            return loaded, None
        try:
            return loaded, open_tokenizer(model)
        except CheckpointError:  # a checkpoint without a tokenizer is served with token-id prompts
            return loaded, None

    settings = ServerSettings(model_name=name or os.path.basename(model.rstrip("/")) or model, max_batch=max_batch,
                              max_queue=max_queue, max_tokens_default=max_tokens_default, api_key=api_key or None,
                              context=ctx, prefill_chunk=prefill_chunk, batch_invariant=batch_invariant,
                              prefix_cache_mb=0 if no_prefix_cache else prefix_cache_mb,
                              prefix_cache_dir=prefix_cache_dir)
    settings.max_request_bytes, settings.docs = max_request_bytes, docs
    if use_ray:
        _serve_on_ray(model, settings, host=host, port=port, replicas=replicas, max_replicas=max_replicas,
                      address=address, threads=threads or 1, dtype=parse_dtype(dtype))
        return
    serve(create_app(load, settings), host=host, port=port, log_level=log_level, drain_timeout=drain_timeout)


def _check_exposure(host: str, api_key: Optional[str], max_request_bytes: int, drain_timeout: float) -> None:
    """Refuse an empty API key (it would serve without one); warn when a reachable host has none."""
    if api_key == "" or (api_key is None and os.environ.get("PYBITNET_API_KEY") == ""):
        raise InputError("the API key is empty (--api-key \"\" or PYBITNET_API_KEY=); give a key, or leave both out "
                         "to serve without authentication")
    if max_request_bytes < 1 or not drain_timeout >= 0:
        raise InputError(f"need --max-request-bytes >= 1 and --drain-timeout >= 0; got {max_request_bytes}, "
                         f"{drain_timeout}")
    if api_key is None and not _is_loopback(host):
        logging.getLogger("pybitnet.serve").warning(
            "warning: listening on %s without an API key: anyone who can reach this port can use the model "
            "(set --api-key or PYBITNET_API_KEY)", host)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def _serve_on_ray(model: str, settings, *, host: str, port: int, replicas: int, max_replicas: Optional[int],
                  address: Optional[str], threads: int, dtype) -> None:
    """The same app from `replicas` Ray Serve replicas (autoscaled up to `max_replicas`), until Ctrl-C."""
    from ..distributed import serving
    from ..distributed.scoring import require_ray

    if max_replicas is not None and max_replicas < replicas:
        raise InputError(f"--max-replicas {max_replicas} is below --replicas {replicas}")
    ray = require_ray()
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    autoscaling = None if max_replicas is None else {"min_replicas": replicas, "max_replicas": max_replicas}
    serving.run(model, host=host, port=port, blocking=True, replicas=replicas, autoscaling_config=autoscaling,
                threads_per_replica=threads, settings=settings, dtype=dtype)
