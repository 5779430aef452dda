"""Signal handling as a context manager, shared by the training loop (checkpoint and stop) and
the sweep (forward to the running subprocess)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

_Self = TypeVar("_Self", bound="SignalHandler")


class SignalHandler:
    """While entered, calls :meth:`handle` on each of ``signals`` (in the main thread only:
    Python delivers signals there, and elsewhere nothing is installed); on exit, or on
    :meth:`restore`, the previous handlers are back."""

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}

    def handle(self, signum: int) -> None:
        """What to do on signal ``signum``; subclasses define it."""
        raise NotImplementedError

    def restore(self) -> None:
        """Puts the previous handlers back (once: later calls do nothing)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        del frame
        self.handle(signum)

    def __enter__(self: _Self) -> _Self:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
