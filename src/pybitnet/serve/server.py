"""Running the app under uvicorn, with a graceful drain on SIGTERM / Ctrl-C.

uvicorn's own shutdown would stop at once (and sse-starlette would end open streams). Instead the first
signal stops admitting requests (new ones get 503), waits until every accepted request is answered and every
open response has finished, then lets uvicorn exit. A second signal exits at once.
"""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from .app import ServerState

log = logging.getLogger("pybitnet.serve")

# How often the drain checks whether the last request has been answered.
DRAIN_POLL_S = 0.05


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self._draining = True
        self.state.drain()
        log.warning("draining: no new requests; finishing the ones already accepted")
        threading.Thread(target=self._exit_when_drained, args=(sig,), name="pybitnet-drain", daemon=True).start()

    def _exit_when_drained(self, sig) -> None:
        while not self.state.drained():
            time.sleep(DRAIN_POLL_S)
        super().handle_exit(sig, None)


def serve(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run `app` (from create_app) until SIGTERM/SIGINT, then drain and return."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
    DrainingServer(config, app.state.server).run()
