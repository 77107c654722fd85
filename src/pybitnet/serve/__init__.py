"""An OpenAI-compatible HTTP server with continuous batching (`pybitnet serve`).

    engine    the scheduler thread: cache rows, chunked prefill, batched decode steps, sampling
    protocol  pydantic request/response models (the OpenAPI schema)
    app       FastAPI endpoints, SSE streaming, error bodies
    metrics   Prometheus metrics
    server    uvicorn with a graceful drain on SIGTERM
"""

from .app import ServerSettings, create_app
from .engine import Engine, GenerationSpec
from .server import serve

__all__ = ["ServerSettings", "create_app", "Engine", "GenerationSpec", "serve"]
