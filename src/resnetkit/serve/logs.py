"""The server's log, escaped. Requests put text in log lines: uvicorn's access log writes the
path, resnetkit's own lines name an upload's file, an exception's message may quote a
request. Every record made while the server runs has its message, its arguments and its
exceptions' messages passed through untrusted.shown, so that no request can add a line or
send a control sequence to the terminal that shows the log. The record factory is the one
hook every logger goes through (uvicorn's, LitServe's, resnetkit's), and the HTTP process,
forked from the one that installs it, inherits it."""
from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from typing import Any, Iterator

from ..untrusted import shown

LOGGER = "resnetkit.serve"


def escaped_traceback(exc: BaseException) -> str:
    """`exc`'s traceback as Python writes it, with each message (its own and those of the
    exceptions it was raised from or while handling) escaped; the frames are code."""
    chain, seen, e = [], set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    parts = []
    for e in reversed(chain):
        frames = "".join(traceback.format_tb(e.__traceback__))
        message = shown(str(e)) if str(e) else ""
        parts.append(f"Traceback (most recent call last):\n{frames}"
                     f"{type(e).__qualname__}{': ' + message if message else ''}")
    return "\n\nThe above exception led to the following one:\n\n".join(parts)


def _arg(value: Any) -> Any:
    return value if value is None or isinstance(value, (bool, int, float)) else shown(value)


def escape_record(record: logging.LogRecord) -> logging.LogRecord:
    """`record` with its message, arguments and exception text escaped (in place)."""
    if isinstance(record.msg, str):
        record.msg = shown(record.msg.rstrip("\n"))
    if isinstance(record.args, tuple):
        record.args = tuple(_arg(a) for a in record.args)
    elif isinstance(record.args, dict):
        record.args = {k: _arg(v) for k, v in record.args.items()}
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = escaped_traceback(record.exc_info[1])
    return record


# The server's own lines (routes.py), escaped by the logger itself too: they are escaped
# where no server installed the record factory (a test driving the routes in-process).
logger = logging.getLogger(LOGGER)
logger.addFilter(escape_record)


@contextlib.contextmanager
def escaped_log(level: str) -> Iterator[logging.Logger]:
    """While the server runs: every log record escaped (see the module's docstring), and the
    server's own logger writing to stderr from `level` ("debug" to "error") up."""
    old = logging.getLogRecordFactory()

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return escape_record(old(*args, **kwargs))
    logging.setLogRecordFactory(make)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    before = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before[0])
        logger.propagate = before[1]
        logging.setLogRecordFactory(old)
