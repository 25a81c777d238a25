"""Ctrl-C and SIGTERM for a command that writes to the database as it goes (`kiln render`).

The signal becomes a KeyboardInterrupt in the main thread at once, wherever it is (in the middle of a pipeline call
too), except inside `transaction()`: there it waits for the transaction to end. Raised inside SQLAlchemy's commit,
rollback or pool code, a KeyboardInterrupt can leave a connection checked out and its state broken; on SQLite such a
connection keeps the file's write lock, so the transaction that puts the jobs in hand back waits out the busy
timeout and fails, and the jobs stay `running` until the next run recovers them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from sqlalchemy.orm import Session, sessionmaker


class _State:
    depth = 0  # transactions open in the main thread
    pending = False  # a signal came while one was open


_state = _State()


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (`docker stop`, systemd, `kill`) both stop this process with a KeyboardInterrupt, never
    in the middle of a `transaction()`."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handle)


def _handle(_signum: int, _frame: FrameType | None) -> None:
    if _state.depth:
        _state.pending = True  # raised as the transaction ends
        return
    raise KeyboardInterrupt


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """`sessions.begin()`, with a stop signal held until it has committed or rolled back. Signals reach only the
    main thread, so other threads' transactions need no holding."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        _state.depth += 1
    try:
        with sessions.begin() as session:
            yield session
    finally:
        if main:
            _state.depth -= 1
            if not _state.depth and _state.pending:
                _state.pending = False
                raise KeyboardInterrupt
