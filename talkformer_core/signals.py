"""Ctrl-C at a safe point: ``defer_sigint()`` holds a SIGINT that arrives inside a short critical
block (create a temp file and remember its name, an optimiser step with its bookkeeping, a rename,
a checkpoint save) and raises KeyboardInterrupt at the block's end, so no interrupt leaves a half
state behind (a leaked temporary file, a checkpoint and a training state of different steps)."""
from __future__ import annotations

import signal
import threading


class defer_sigint:
    """Context manager; a no-op outside the main thread (Python delivers signals only there, e.g.
    not in a ComfyUI worker, whose Cancel goes through the host's own check instead)."""

    def __enter__(self) -> "defer_sigint":
        self.hit, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            try:
                self.old = signal.signal(signal.SIGINT, self._hold)
            except (ValueError, OSError, TypeError):  # no signal support here (embedded interpreter)
                self.old = None
        return self

    def _hold(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, et, ev, tb) -> bool:
        if self.old is None:
            return False
        signal.signal(signal.SIGINT, self.old)
        if self.hit and et is None:
            if callable(self.old):
                self.old(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt
            elif self.old != signal.SIG_IGN:
                raise KeyboardInterrupt
        return False
