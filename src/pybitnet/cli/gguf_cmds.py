"""Commands registered on the pybitnet CLI app (see cli/app.py)."""

from .app import app  # noqa: F401
