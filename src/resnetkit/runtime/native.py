"""resnetkit's own C++ (the direct oneDNN path, the fused BN kernels of training): built with
the C++ compiler TorchInductor uses on first use, cached, and loaded with ctypes."""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import UserError
from .compiling import cxx


def load_native(source: Path, flags: list[str], key: str = "") -> ctypes.CDLL:
    """`source` built with `flags` (compiler flags and libraries) and loaded. The build is
    cached beside the weights' cache ($RESNETKIT_CACHE/.. or ~/.cache/resnetkit) as
    NAME-HASH.so, one file per source, compiler, flags and `key` (what else the build depends
    on: a library's version, the CPU's instruction sets), earlier builds of NAME removed; a
    cache that cannot be written, or that another user could write, builds into a private
    temporary folder instead, and a cached file that does not load is built again. Raises
    UserError when the compiler fails, OSError when the result does not load."""
    from ..weights.download import cache_dir
    compiler = cxx()
    if not compiler:
        raise UserError(f"building {source.name} needs a C++ compiler (g++ or $CXX)")
    digest = hashlib.sha256(source.read_bytes() +
                            "|".join([compiler, *flags, key]).encode()).hexdigest()
    out = cache_dir().parent / f"{source.stem}-{digest[:16]}.so"
    if out.is_file() and _own(out):
        try:
            return ctypes.CDLL(str(out))
        except OSError:
            pass  # damaged: built again below
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if not _own(out.parent):
            raise PermissionError(f"{out.parent} is not this user's alone")
        _compile(compiler, source, flags, out)
        for old in out.parent.glob(f"{source.stem}-*.so"):  # earlier builds
            if old != out:
                old.unlink(missing_ok=True)
        return ctypes.CDLL(str(out))
    except OSError:
        with tempfile.TemporaryDirectory(prefix=f"resnetkit-{source.stem}-") as tmp:
            target = Path(tmp) / out.name
            _compile(compiler, source, flags, target)
            return ctypes.CDLL(str(target))  # stays mapped once the folder is gone


def _compile(compiler: str, source: Path, flags: list[str], target: Path) -> None:
    """`source` built into `target`, atomically (a temporary file beside it, then renamed): a
    build cut short never leaves a half-written library behind."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{source.stem}-", suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, "-std=c++17", "-shared", "-fPIC", str(source), *flags,
                        "-o", tmp], check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise UserError(f"building {source.name} failed: {e.stderr.strip()[-500:]}") from None
    except subprocess.SubprocessError as e:
        raise UserError(f"building {source.name} failed: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _own(path: Path) -> bool:
    """Whether `path` belongs to this user and no one else may write it: code is loaded
    from there, so a shared cache folder (e.g. under /tmp) is not trusted."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022
