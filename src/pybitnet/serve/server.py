"""Running the app under uvicorn, with a bounded graceful drain on SIGTERM / Ctrl-C.

uvicorn's own shutdown would stop at once (and sse-starlette would end open streams). Instead the first
signal stops admitting requests (new ones get 503), waits until every accepted request is answered and every
open response has finished, then lets uvicorn exit. The wait is bounded (`drain_timeout`); a second signal
ends it at once. A request whose body has not fully arrived is not accepted yet, so it never holds a drain up.

The listening socket is bound before anything else happens (before the model loads), so a port that is
taken is one line and exit 1, not a log from a server that has already started loading.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time

import uvicorn

from ..errors import InputError
from .app import ServerState, save_prefix_cache

log = logging.getLogger("pybitnet.serve")

# How often the drain checks whether the last request has been answered.
DRAIN_POLL_S = 0.05
# Seconds a drain waits for accepted requests before the server stops anyway.
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Seconds uvicorn then waits for connections that carry no accepted request (a body still arriving).
SHUTDOWN_GRACE_S = 3.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S):
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: stop now, whatever is still open
            log.warning("second signal: stopping now")
            self._stop_engine()
            self.force_exit = True
            return super().handle_exit(sig, frame)
        self._draining = True
        self.state.drain()
        log.warning("draining: no new requests; finishing the ones already accepted (for up to %g s; a second "
                    "signal stops at once)", self.drain_timeout)
        threading.Thread(target=self._exit_when_drained, args=(sig,), name="pybitnet-drain", daemon=True).start()

    def _exit_when_drained(self, sig) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while not self.state.drained():
            if self.should_exit:  # a second signal came first
                return
            if time.monotonic() >= deadline:
                log.warning("drain timeout: %d request(s) still open after %g s; stopping",
                            self.state.in_flight, self.drain_timeout)
                self._stop_engine()
                self.force_exit = True
                break
            time.sleep(DRAIN_POLL_S)
        super().handle_exit(sig, None)


    def _stop_engine(self) -> None:
        """Stop the scheduler and save the prefix cache before a forced exit, which skips the app's shutdown
        (and, for SIGTERM, ends the process as uvicorn re-raises the signal)."""
        if self.state.engine is not None:
            self.state.engine.stop(timeout=5)
            save_prefix_cache(self.state)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (as uvicorn binds it), or an InputError saying in one line why not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use (another server?); pick another with --port") from None
        raise InputError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    except (socket.gaierror, UnicodeError) as err:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {err}") from None
    sock.set_inheritable(True)
    return sock


def serve(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S) -> None:
    """Run `app` (from create_app) until SIGTERM/SIGINT, then drain (for up to `drain_timeout` seconds) and
    return; uvicorn then re-raises the signal. Binds host:port first: a port in use is an InputError."""
    sock = bind(host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    server = DrainingServer(config, app.state.server, drain_timeout)
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("uvicorn.error").info("listening on http://%s:%d (Ctrl-C or SIGTERM drains, then stops)",
                                            shown, port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        state: ServerState = app.state.server
        if state.engine is not None:  # uvicorn skips the app's shutdown when forced
            state.engine.stop(timeout=5)
            save_prefix_cache(state)
