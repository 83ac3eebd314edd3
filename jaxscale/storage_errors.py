"""How the storage layer's failures reach the user: one line each, their tracebacks in the debug log.

Orbax and TensorStore report a failed read or write several times over: Orbax's error logs with
tracebacks, asyncio's never-retrieved tasks, and `sys.unraisablehook` reports of reads that finish
after their event loop closed. `Checkpointer` raises one `UserError` per failure instead and
installs `quiet_storage_errors` so that the rest goes to the `jaxscale` logger at debug level.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("jaxscale")


def one_line(e: BaseException) -> str:
    """An exception in one short line: the innermost cause, which names the file that failed."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).split(" See full TensorStore details")[0].strip()
    lines = text.splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _from_storage(code_file: str) -> bool:
    return "orbax" in code_file or "tensorstore" in code_file


# what TensorStore's C++ errors carry: their spec, or (OCDBT reads) the database they read
_TENSORSTORE_MARKS = ("tensorstore_spec", "in OCDBT database at")


def _raised_in_storage(e: BaseException | None) -> bool:
    """Whether `e` comes from the storage layer: raised in its Python code, or by TensorStore's
    C++ (`_TENSORSTORE_MARKS`), as a read left behind in an asyncio task is."""
    if e is not None and any(mark in str(e) for mark in _TENSORSTORE_MARKS):
        return True
    tb = e.__traceback__ if e is not None else None
    while tb is not None and not _from_storage(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb is not None


class _StorageErrorsToDebug(logging.Filter):
    """Orbax logs each failure it raises with a traceback (to absl's logger), often several times
    over, and asyncio logs the reads left behind by a failed restore ("Task exception was never
    retrieved"); `Checkpointer` reports the failure in one line instead, and these go to the
    debug log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and (_from_storage(record.pathname) or _raised_in_storage(
                record.exc_info[1] if record.exc_info else None)):
            log.debug("storage layer: %s", record.getMessage(), exc_info=record.exc_info)
            return False
        return True


def quiet_storage_errors() -> None:
    """Send the storage layer's own reports of the failures `Checkpointer` raises to the debug log.

    Besides the error logs above: when one array of a step fails to read, the other reads may
    finish after their event loop closed, and Python reports "Event loop is closed" and
    never-awaited coroutines through `sys.unraisablehook`, one traceback each. Installed once per
    process; other log records and unraisable errors pass through unchanged.
    """
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    if any(isinstance(f, _StorageErrorsToDebug) for f in loggers[0].filters):
        return
    for logger in loggers:
        logger.addFilter(_StorageErrorsToDebug())
    previous = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if (str(unraisable.exc_value) == "Event loop is closed"
                or _from_storage(code.co_filename if code is not None else "")
                or _raised_in_storage(unraisable.exc_value)):
            log.debug("storage layer after a failed read: %s %s", unraisable.err_msg,
                      one_line(unraisable.exc_value))
        else:
            previous(unraisable)

    sys.unraisablehook = hook
