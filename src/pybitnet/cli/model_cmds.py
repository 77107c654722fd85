"""Commands on a model: info, score, perplexity, bench (registered below)."""

from .app import app  # noqa: F401
