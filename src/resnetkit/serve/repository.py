"""The model repository: `DIR/NAME/VERSION/` folders (Triton's layout), each holding what
`resnetkit serve` takes (a run folder's checkpoints, a .safetensors checkpoint, an .onnx file,
an OpenVINO IR, an int8 file), read on each poll; and one source served as a repository of
one model at version 1.

Every name read from the folder is untrusted: a model name must be a plain name of at most
MAX_NAME_CHARS characters (it becomes part of URLs, metric labels and state file names), a
version a whole number; anything else is skipped with one escaped log line. A version is
identified by a fingerprint of its files (names, sizes, modification times): a changed
fingerprint is a new load, and a load that failed is tried again only when its files change."""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..untrusted import shown
from ..weights.checkpoint import atomic_write
from .logs import logger

# Model names: what KServe and Triton users write in URLs, bounded (a metric label and a
# state file name each).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_NAME_CHARS = 64
MAX_VERSION = 10**9  # Triton's versions are positive int64; a folder name of 10 digits at most
MAX_MODELS = 256  # models read from one repository; more are skipped with a log line
MAX_VERSIONS = 64  # versions read per model: the highest ones
MAX_FILES = 2000  # files fingerprinted per version (a run folder holds a few dozen)
MODEL_SUFFIXES = (".onnx", ".xml")  # exported files; otherwise the folder is a run folder
SINGLE_FINGERPRINT = "fixed"  # the one source of `resnetkit serve SOURCE`: never re-read


@dataclass(frozen=True)
class Version:
    """One version on disk: `spec` (what open_source takes) and its files' fingerprint."""

    name: str
    version: int
    spec: str
    fingerprint: str

    @property
    def key(self) -> str:
        """"NAME/VERSION/FINGERPRINT": one load of one version, in payloads and state files."""
        return f"{self.name}/{self.version}/{self.fingerprint}"


def check_name(name: str, what: str = "model name") -> str:
    """`name` if it is a model name (letters, digits, '_', '.', '-', starting with a letter
    or digit, at most 64 characters), else UserError."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"the {what} {shown(repr(name))[:80]} is not a model name: use letters, "
                        f"digits, '_', '.' or '-', starting with a letter or digit, at most "
                        f"{MAX_NAME_CHARS} characters")
    return name


def name_of(source: str) -> str:
    """The model name of `resnetkit serve SOURCE`: a run folder's or file's name (without its
    suffix), with anything a model name cannot hold turned into '-'."""
    path = Path(str(source).rstrip("/\\"))
    stem = path.name if path.is_dir() else path.stem
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem)[:MAX_NAME_CHARS].lstrip("._-")
    return name or "model"


def fingerprint(folder: Path) -> str:
    """A digest of the relative names, sizes and modification times of the files under
    `folder` (at most MAX_FILES; links are not followed into folders)."""
    h, count = hashlib.sha256(), 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            count += 1
            if count > MAX_FILES:
                h.update(b"...more")
                return h.hexdigest()[:16]
            p = Path(root, f)
            try:
                st = p.stat()
            except OSError:
                continue  # removed while walking: the next poll sees the rest
            h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
                "utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def model_spec(folder: Path, engine: str = "auto") -> str:
    """What open_source reads in a version folder: its exported file (.onnx, or an OpenVINO
    .xml with engine "openvino" where both are there), else the folder (a run folder or a
    folder with one .safetensors checkpoint). Raises UserError for several of one kind."""
    found = {s: sorted(p for p in folder.glob(f"*{s}") if p.is_file()) for s in MODEL_SUFFIXES}
    order = (".xml", ".onnx") if engine == "openvino" else (".onnx", ".xml")
    for suffix in order:
        if len(found[suffix]) > 1:
            raise UserError(f"{shown(folder)} holds {len(found[suffix])} {suffix} files: keep "
                            f"one model per version folder")
        if found[suffix]:
            return str(found[suffix][0])
    if (folder / "best.safetensors").exists() or (folder / "last.safetensors").exists():
        return str(folder)  # a run folder: its best, else last, checkpoint
    checkpoints = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if len(checkpoints) != 1:
        raise UserError(f"{shown(folder)} holds {len(checkpoints)} .safetensors files and no "
                        f"best.safetensors or last.safetensors: keep one model per version "
                        f"folder" if checkpoints else f"{shown(folder)} holds no model file "
                        f"(.safetensors, .onnx, .xml) yet")
    return str(checkpoints[0])


def _entries(folder: Path, limit: int) -> list[Path]:
    """The sub-folders of `folder` (links followed, hidden names skipped), at most `limit`."""
    out = []
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith(".") or not e.is_dir():
                    continue
                out.append(Path(e.path))
    except OSError as e:
        logger.warning("cannot read the folder %s: %s", shown(folder), shown(e.strerror or e))
    if len(out) > limit:
        logger.warning("%s has %d folders; the first %d by name are read", shown(folder),
                       len(out), limit)
    return sorted(out)[:limit]


class Repository:
    """The versions a repository folder holds now (`scan`); `single` for one source."""

    def __init__(self, root: str | None = None, source: str | None = None,
                 name: str | None = None, engine: str = "auto"):
        self.root = Path(root) if root else None
        self.source, self.engine = source, engine
        self.single_name = check_name(name) if name else (name_of(source) if source else None)
        self.warned: set[str] = set()

    def check(self) -> None:
        """UserError unless the repository folder exists and holds at least one model."""
        if self.root is None:
            return
        try:
            if not stat.S_ISDIR(self.root.stat().st_mode):
                raise UserError(f"--model-repository {shown(self.root)} is not a folder")
        except FileNotFoundError:
            raise UserError(f"--model-repository {shown(self.root)} does not exist") from None
        if not self.scan():
            raise UserError(f"--model-repository {shown(self.root)} holds no model: lay it out "
                            f"as DIR/NAME/VERSION/ (e.g. DIR/fashion/1/ holding a run folder's "
                            f"files, a .safetensors checkpoint or an .onnx file)")

    def scan(self) -> list[Version]:
        """Every version on disk now, by name then version."""
        if self.root is None:
            return [Version(self.single_name, 1, str(self.source), SINGLE_FINGERPRINT)]
        out = []
        for model in _entries(self.root, MAX_MODELS):
            if not NAME.fullmatch(model.name):
                self._warn_once(f"skipped the folder {shown(repr(model.name))[:80]} in the model "
                                f"repository: not a model name (letters, digits, '_', '.', "
                                f"'-', at most {MAX_NAME_CHARS} characters)")
                continue
            numbered = [p for p in _entries(model, 10_000) if p.name.isascii()
                        and p.name.isdigit() and 1 <= int(p.name) <= MAX_VERSION]
            for v in sorted(numbered, key=lambda p: int(p.name))[-MAX_VERSIONS:]:
                try:
                    spec = model_spec(v, self.engine)
                except UserError as e:
                    self._warn_once(f"skipped {shown(v)}: {e}")
                    continue
                out.append(Version(model.name, int(v.name), spec, fingerprint(v)))
        return out

    def _warn_once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            logger.warning("%s", message)


# ---- state shared between the processes of a server, as small JSON files -----------------

def write_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, replaced atomically (a reader never sees half a file)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))


def read_json(path: Path) -> Any:
    """The JSON at `path` (written by this server's own processes), None if absent."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def info_path(state_dir: Path, key: str) -> Path:
    """Where a loaded version's metadata is kept (the key's parts are a checked name, a
    number and a hex digest: one safe component each)."""
    name, version, fp = key.split("/")
    return state_dir / "models" / name / version / f"{fp}.json"
