"""A test seam for power-cut tests: a flashing process stops itself at a named point.

With `PALISADE_TEST_PAUSE_AT=<name>` in its environment, a process reaching `pause_point(name)`
sends itself SIGSTOP, so a test can wait for the stop (state `T` in /proc/PID/stat) and then
SIGKILL it at exactly that point. Unset (always, outside tests), it does nothing.
"""

from __future__ import annotations

import os
import signal

PAUSE_ENV = "PALISADE_TEST_PAUSE_AT"


def pause_point(name: str) -> None:
    if os.environ.get(PAUSE_ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)
