"""The OpenAI-compatible server on Ray Serve: N replicas of the one-process app behind one HTTP address.

Each replica builds the app of `pybitnet.serve.app.create_app` (its own model, engine and continuous
batching), so the routes, validation and numbers are those of `pybitnet serve`; Ray Serve's proxy
spreads requests over the replicas. Responses carry an `x-pybitnet-replica` header naming the replica
that answered, so spreading can be observed.
"""

from __future__ import annotations

from typing import Any

from .scoring import require_ray

REPLICA_HEADER = "x-pybitnet-replica"


def _load(model_spec: str, dtype, threads: int):
    """What create_app's background loader calls on a replica: (model, tokenizer or None)."""
    import torch

    from ..errors import PyBitNetError
    from ..loaders import load, load_tokenizer

    torch.set_num_threads(threads)
    model = load(model_spec, dtype=dtype)
    try:
        tokenizer = load_tokenizer(model_spec)
    except PyBitNetError:  # a model without a tokenizer serves token-id prompts
        tokenizer = None
    return model, tokenizer


def deployment(model_spec: str, *, replicas: int = 2, threads_per_replica: int = 1,
               cpus_per_replica: float | None = None, autoscaling_config: dict[str, Any] | None = None,
               settings=None, dtype=None):
    """A bound Ray Serve application serving `model_spec` from `replicas` replicas (or autoscaled by
    `autoscaling_config`, passed to Ray Serve as is: min_replicas, max_replicas, target_ongoing_requests...).
    `settings` is a `pybitnet.serve.app.ServerSettings` (batch size, context, API key, model name)."""
    import torch

    require_ray()
    try:
        from ray import serve
    except ImportError:
        from .scoring import RayUnavailableError

        raise RayUnavailableError("serving on Ray needs Ray Serve: pip install \"ray[serve]\"") from None
    dtype = dtype or torch.float32

    def build_app():
        from ..serve.app import create_app

        app = create_app(lambda: _load(model_spec, dtype, threads_per_replica), settings)
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        return app

    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": threads_per_replica if cpus_per_replica is None
                                                     else cpus_per_replica}}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = replicas

    @serve.deployment(name="pybitnet", **options)
    @serve.ingress(build_app)
    class PyBitNetServer:
        """One replica: the one-process server app, built on the replica."""

    return PyBitNetServer.bind()


def run(model_spec: str, *, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False, **kwargs):
    """Start Ray Serve's HTTP proxy on host:port and deploy `deployment(model_spec, **kwargs)` at "/"."""
    require_ray()
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    return serve.run(deployment(model_spec, **kwargs), name="pybitnet", route_prefix="/", blocking=blocking)
