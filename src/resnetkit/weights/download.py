"""Downloads of published weights into a cache, hash-checked before they are used.

torch.hub's downloader fetches into a temporary file beside the target; the file is hashed
(SHA-256, a SHA-256 prefix as torchvision puts in its file names, or MD5 as Paddle
publishes) and only then renamed into place. A mismatch deletes the file and says so."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import UserError
from ..untrusted import path_component
from .checkpoint import atomic_write

ENV = "RESNETKIT_CACHE"


def cache_dir() -> Path:
    """$RESNETKIT_CACHE, else $XDG_CACHE_HOME/resnetkit/weights (~/.cache/...)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnetkit" / "weights"


def file_hash(path: Path, kind: str) -> str:
    """The hex digest of a file: "sha256" (for sha256 and sha256_prefix) or "md5"."""
    h = hashlib.md5() if kind == "md5" else hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_matches(path: Path, expected: str | None, kind: str | None) -> bool:
    """Whether the file has the expected hash (always true when none is published)."""
    if not expected or not kind:
        return True
    digest = file_hash(path, kind)
    return digest.startswith(expected.lower()) if kind == "sha256_prefix" else \
        digest == expected.lower()


def download(url: str, filename: str, expected: str | None, kind: str | None,
             folder: Path | None = None, progress: bool = True) -> Path:
    """The file at `url`, from the cache when it is already there with the right hash, else
    downloaded, checked and renamed into the cache. Raises UserError when offline, on an
    HTTP error or a hash mismatch (nothing is left behind)."""
    import urllib.error

    from torch.hub import download_url_to_file
    folder = folder or cache_dir()
    dest = folder / path_component(filename, "weights file name")
    if dest.is_file() and hash_matches(dest, expected, kind):
        return dest
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the weights cache {folder}: {e.strerror or e} "
                        f"(set {ENV} to another folder)") from None
    def fetch(tmp: str) -> None:  # checked before atomic_write renames it into place
        download_url_to_file(url, tmp, progress=progress)
        if not hash_matches(Path(tmp), expected, kind):
            raise UserError(f"{url} does not match its published {kind} {expected} "
                            f"(damaged or changed); the download was deleted")

    try:  # a temporary file per process (ranks may fetch at once), renamed when it is whole
        atomic_write(dest, fetch)
    except UserError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError included
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        raise UserError(f"could not download {url} ({reason}); fetch it by hand and put it "
                        f"at {dest}") from None
    finally:
        for partial in folder.glob(f".{dest.name}.*.partial.*.partial"):  # torch.hub's own
            partial.unlink(missing_ok=True)
    return dest
