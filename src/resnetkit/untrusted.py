"""Input from outside, made safe at the one place each kind enters: text that is shown to a
person, a name that becomes part of a path, JSON read from a file or a request, a file named
by a user. Class names come from folder names and from files other people made; metadata,
tags and file names the same: none of it is trusted.

Each helper raises UserError with one sentence (a user's mistake or a hostile file), never
a traceback."""
from __future__ import annotations

import os
import re
import stat
import unicodedata
from pathlib import Path
from typing import Any

from .errors import UserError

# JSON read from a file (checkpoint, ONNX and OpenVINO metadata, a run's config.json):
# far above what resnetkit writes (a 1000-class list is about 25 KB, nesting depth 3),
# far below what costs memory or recursion.
MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 32
# a path component: what ext4 and most file systems allow, in bytes
MAX_NAME_BYTES = 255

_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _escape(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def shown(value: Any) -> str:
    """`value` as text that is safe to print on a terminal or write to a log: every control,
    format (bidirectional overrides, zero-width marks), separator and unassigned character
    written as a Python-style escape (ESC as \\x1b, a line break as \\x0a), so that no string
    from outside can move the cursor, recolour the screen or add lines. Rich markup is a
    separate matter: render.py shows such text as plain rich Text, never as markup."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():  # the common case, in C
        return text
    return "".join(_escape(c) if unicodedata.category(c) in _UNSAFE_CATEGORIES else c
                   for c in text)


def path_component(name: Any, what: str) -> str:
    """`name` if it is one safe path component (not empty, not "." or "..", no slash or
    backslash, no control character, at most 255 bytes), else UserError naming `what` ("run
    name", "tag"): a name from a user, a recipe or a file never climbs out of its folder or
    points somewhere absolute."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"the {what} must be a non-empty name, got {shown(repr(name))}")
    bad = ("/" in name or "\\" in name or name in (".", "..") or not name.isprintable()
           or name != name.strip() or len(os.fsencode(name)) > MAX_NAME_BYTES)
    if bad:
        raise UserError(f"the {what} {shown(repr(name))} is not a plain folder or file name: "
                        f"use letters, digits, '-', '_' or '.', with no '/', no '..' and at "
                        f"most {MAX_NAME_BYTES} bytes")
    return name


# A JSON string, or what is left of the text from an unterminated one: each match starts at
# a quote and always succeeds without backtracking (possessive), so the scan takes linear
# time. A pattern that can fail and be retried from every later quote took 3.3 s for 32 KB of
# escaped quotes (quadratic).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.S)


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, counted in linear time without
    parsing (so that a hostile file cannot make the parser recurse); strings left out."""
    import numpy as np
    skeleton = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    step = (np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64)
            - np.isin(skeleton, (ord("]"), ord("}"))).astype(np.int64))
    return int(np.cumsum(step).max(initial=0))


def parse_json(text: str | bytes, source: str, what: str = "metadata",
               max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from outside, bounded before it is parsed: at most `max_bytes` and nesting depth
    `max_depth`; a damaged text is one UserError naming `source` and `what`."""
    import json
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(data) > max_bytes:
        raise UserError(f"{shown(source)}: its {what} is {len(data):,} bytes, over the limit of "
                        f"{max_bytes:,}; the file is damaged or was not written by resnetkit")
    if json_depth(data) > max_depth:
        raise UserError(f"{shown(source)}: its {what} nests deeper than {max_depth} levels; the "
                        f"file is damaged or was not written by resnetkit")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise UserError(f"{shown(source)}: its {what} is not valid JSON "
                        f"({shown(str(e))[:120]})") from None


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it names a regular file (following links), else UserError: a FIFO, a
    device or a socket would block or never end when read, a folder is not a file."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"no {what} at {shown(p)}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {shown(p)}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise UserError(f"{shown(p)} is {kind}, not a regular {what}")
    return p


# The globals a pickle of numpy arrays names (CIFAR's python batches, Paddle's .pdparams):
# array reconstruction, dtypes and scalars under numpy 1 and 2 module names, OrderedDict,
# and `_codecs.encode`, how protocol-2 pickles spell bytes.
NUMPY_PICKLE = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("_codecs", "encode"),
})


def restricted_unpickle(data: bytes, source: str, allowed: frozenset = NUMPY_PICKLE,
                        encoding: str = "ASCII") -> Any:
    """A pickle from outside loaded with no code run: only the globals in `allowed` may be
    named (numpy arrays and plain containers by default); anything else, or a damaged
    stream, is one UserError naming `source`."""
    import io
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in allowed:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays and "
                                         f"plain containers are allowed")
    try:
        return _Restricted(io.BytesIO(data), encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, RecursionError) as e:
        raise UserError(f"{shown(source)} cannot be read safely as a pickle of arrays "
                        f"({shown(str(e))[:160]})") from None
