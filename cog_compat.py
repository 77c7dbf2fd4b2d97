"""What coglet 0.23.1 (the Cog server requirements-test.txt and the image pin) needs worked around.

predict.py adapts Cog to the engine; these are the server behaviours it has to go around, each shown
on the pinned server, without the workaround, by tests/service/test_cog_compat.py (a test there that fails
says the server changed and the workaround can go):

- Streaming: an async-generator predict()'s output is sent only when it ends, while a (sync)
  generator returned by an async predict() is streamed: predict.py returns one.
- Cancel: the server cancels an async predict() through the concurrent.futures.Future of
  run_coroutine_threadsafe, also after predict() has returned the generator it streams, when that
  cancel is a no-op: the prediction is reported canceled and the generator runs to its end
  (`submit`, `on_server_cancel`, `CancelLink`).
- Shutdown: on SIGTERM the server closes its listener, then waits for every running prediction
  with no deadline and tells the worker nothing (`watch_server_shutdown`; predict.py drains).
- Logs: a line written to sys.stderr is filed under the setup or prediction whose context (a
  ContextVar) writes it; the server iterates the returned generator on its own thread, outside that
  context, where a line is a worker log: predict.py reports from a copy of predict()'s context, and
  the engine writes a request's lines in its submitter's (`route_logs` sends glm's to sys.stderr).
- Integers: JSON Schema's integer accepts 16.0, and the float reaches predict() (`whole_number`).
- An explicit null for an optional input is answered 422: clients leave the input out (README).

tests/service/test_service_http.py and tests/service/test_hostile.py check the workarounds through predict.py.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from typing import Any, Callable


def route_logs(name: str) -> None:
    """The `name` logger's lines into the server's logs (sys.stderr, the server's writer), once each."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[{name}] %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # one copy of each line, whatever the root logger has


def whole_number(name: str, value):
    """JSON Schema's integer accepts 16.0, and the server passes it on as a float."""
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(value)
    return value


def on_server_cancel(callback: Callable[[], None]) -> bool:
    """Call `callback` when the server cancels the prediction whose predict() is running now.

    coglet 0.23.1 runs an async predict() with asyncio.run_coroutine_threadsafe and cancels it by
    calling cancel() on the concurrent.futures.Future it got back; it keeps calling that after
    predict() has returned the generator it streams, when cancel() on the finished future is a
    no-op. So we find that future (asyncio chains it to our task with a done-callback that holds
    it) and wrap its cancel(). Returns False when it is not found (another server): the prediction
    then runs to its end when cancelled. tests/service/test_service_http.py checks this against the real server.
    """
    task = asyncio.current_task()
    for cb, _ in getattr(task, "_callbacks", None) or ():
        for cell in getattr(cb, "__closure__", None) or ():
            future = cell.cell_contents
            if isinstance(future, concurrent.futures.Future):
                server_cancel = future.cancel

                def cancel() -> bool:
                    callback()
                    return server_cancel()

                future.cancel = cancel
                return True
    return False


def watch_server_shutdown(port: int, on_shutdown: Callable[[], None], interval: float = 0.5) -> bool:
    """Call `on_shutdown` once the server stops accepting connections on `port`.

    coglet 0.23.1 closes its listener on SIGTERM, then waits for every running prediction with no
    deadline and tells the worker nothing; a refused connection is the one sign the worker can see.
    Returns False (nothing watched) when the port does not accept now, e.g. a server bound elsewhere.
    """
    def accepting() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return True
        except ConnectionRefusedError:
            return False
        except OSError:
            return True  # slow or unreachable is not a shutdown

    if not accepting():
        return False

    def watch() -> None:
        refused = 0
        while refused < 2:  # twice in a row
            time.sleep(interval)
            refused = 0 if accepting() else refused + 1
        on_shutdown()

    threading.Thread(target=watch, name="glm-shutdown-watch", daemon=True).start()
    return True


async def submit(start: Callable[[], Any], log: Callable[[str], None]) -> Any:
    """`start()` (queues a request, returns its stream) run off the event loop, with the server's
    cancel of the running prediction wired to that stream (`on_server_cancel`): in place before the
    request is queued, so no cancel falls in between, and attached in the worker thread, since a
    cancelled await never returns the stream."""
    link = CancelLink()
    if not on_server_cancel(link):
        log("warning: this server's cancel cannot reach the engine; a cancelled prediction runs to its end")

    def run():
        stream = start()
        link.attach(stream)
        return stream

    return await asyncio.to_thread(run)


class CancelLink:
    """The server's cancel for one prediction, callable before its stream exists."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requested = False
        self._stream = None

    def __call__(self) -> None:
        with self._lock:
            self._requested, stream = True, self._stream
        if stream is not None:
            stream.cancel()

    def attach(self, stream) -> None:
        with self._lock:
            self._stream, requested = stream, self._requested
        if requested:
            stream.cancel()
