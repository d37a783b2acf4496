"""Checkpoints: weights as safetensors (self-describing: architecture, classes and
preprocessing in its metadata) plus training state read with torch.load(weights_only=True).
Every file is written atomically: temporary file, fsync, rename."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from ..config import ResNetConfig
from ..errors import UserError
from ..geometry import MAX_IMAGE_SIZE
from ..model import ResNet
from ..options import field_types, fits
from ..untrusted import parse_json, regular_file, shown


TMP_SUFFIX = ".partial"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_partial_files(folder: Path) -> int:
    """Delete the temporary files an interrupted atomic_write left in `folder`."""
    n = 0
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)`, fsync, then rename over `path`; on any error the old
    file stays untouched and the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def default_output(path: str | Path) -> str | Path:
    """An output name the user did not choose (no -o): refused when something is there
    already, so that a default never replaces a user's file. An output named with -o is
    replaced, atomically."""
    if os.path.lexists(path):
        raise UserError(f"{shown(path)} already exists; name the output with -o to replace it")
    return path


def save_weights(path: Path, model: ResNet, meta: dict[str, Any]) -> None:
    """The model's state_dict plus metadata: "resnet_config", "classes", "preprocess"."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header = {"resnet_config": json.dumps(config_to_dict(model.cfg)),
              **{k: json.dumps(v) for k, v in meta.items()}}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    except (OSError, SafetensorError) as e:  # a full disk comes as SafetensorError
        raise UserError(f"cannot write checkpoint {path}: {getattr(e, 'strerror', None) or e}"
                        ) from None


def save_state(path: Path, state: dict[str, Any]) -> None:
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        reason = getattr(e, "strerror", None) or \
            "the disk is full or refused the write (" + str(e).splitlines()[0][:80] + ")"
        raise UserError(f"cannot write checkpoint {path}: {reason}") from None


def load_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"no training state at {path}") from None
    except Exception as e:  # a damaged or foreign file: unpickling refused or broken
        raise UserError(f"{path} is not a resnetkit training state ({e})") from None


def config_to_dict(cfg: ResNetConfig) -> dict[str, Any]:
    """The config as JSON-ready data (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def checkpoint_file(path: str | Path) -> Path:
    """A .safetensors path as given, or a run folder's best (else last) checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("best.safetensors", "last.safetensors")
                 if (path / n).exists()]
        if not found:
            raise UserError(f"{shown(path)} holds no best.safetensors or last.safetensors")
        path = found[0]
    return path


def read_checkpoint(path: str | Path, foreign: bool = False
                    ) -> tuple[ResNetConfig, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(architecture, weights, metadata) of a .safetensors checkpoint or a run folder (its
    best, else last, checkpoint), from one open and one read of the file: the header's
    metadata checked (parse_metadata) and its size checked against the tensors it declares
    before the rest is read, then finite weights, then the architecture against the tensors
    on the meta device. A safetensors file without resnetkit's metadata: None with
    foreign=True (the caller reads it as foreign weights), else UserError."""
    path = checkpoint_file(path)
    regular_file(path, "checkpoint")
    try:
        with open(path, "rb") as f:  # the one open
            meta = _safetensors_metadata(f, path)
            if "resnet_config" not in meta:
                if foreign:
                    return None
                raise UserError(f"{shown(path)} has no resnet_config metadata: not written by "
                                f"resnetkit; load its weights into a model you build with "
                                f"create_model instead")
            cfg, info = parse_metadata(meta, str(path))
            f.seek(0)
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read checkpoint {shown(path)}: {e.strerror or e}") from None
    try:
        weights = load(data)
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{shown(path)} is not a safetensors checkpoint ({e})") from None
    del data
    check_finite(weights, str(path))
    with torch.device("meta"):  # the architecture checked against the file before any memory
        load_weights_into(ResNet(cfg), weights, str(path), check_only=True)
    return cfg, weights, info


def _safetensors_metadata(f: BinaryIO, path: Path) -> dict[str, str]:
    """The __metadata__ of an open safetensors file's header (an 8-byte little-endian
    length, then that much JSON), bounded as untrusted JSON is, and the file's size checked
    against the tensors the header declares before the rest is read."""
    bad = f"{shown(path)} is not a safetensors checkpoint"
    size, whole = int.from_bytes(f.read(8), "little"), os.fstat(f.fileno()).st_size
    if not 0 < size <= whole - 8:
        raise UserError(f"{bad} (no header)")
    header = parse_json(f.read(size), str(path), "safetensors header")
    if not isinstance(header, dict):
        raise UserError(f"{bad} (its header is not an object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{bad} (its metadata is not text)")
    ends = [v.get("data_offsets") if isinstance(v, dict) else None
            for k, v in header.items() if k != "__metadata__"]
    if not all(isinstance(e, list) and len(e) == 2 and all(type(o) is int for o in e)
               for e in ends) or 8 + size + max((e[1] for e in ends), default=0) != whole:
        raise UserError(f"{bad} (its size is not what its header says)")
    return meta


def _bad_meta(source: str, what: str) -> UserError:
    return UserError(f"{shown(source)}: its metadata {what}; the file is damaged or was not "
                     f"written by resnetkit")


def parse_metadata(meta: dict[str, str], source: str) -> tuple[ResNetConfig, dict[str, Any]]:
    """Checkpoint metadata (untrusted text) -> (config, {"classes", "preprocess", ...}),
    validated as user input is: bounded JSON, known keys of the right types, sizes within
    ResNetConfig's bounds, classes matching the head, a usable normalisation. Raises
    UserError naming what is wrong."""
    info = {k: parse_json(v, source, f"{shown(k)} entry") for k, v in meta.items()}
    raw = info.pop("resnet_config")
    if not isinstance(raw, dict):
        raise _bad_meta(source, "has no resnet_config object")
    types = field_types(ResNetConfig)
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise _bad_meta(source, f"names unknown config fields {shown(', '.join(unknown))[:200]}")
    wrong = [k for k, v in raw.items() if not fits(v, types[k])]
    if wrong:
        raise _bad_meta(source, f"has config values of the wrong type ({', '.join(wrong)})")
    try:  # missing fields take their defaults; sizes are bounded by the config's validation
        cfg = ResNetConfig(**raw)
    except UserError as e:
        raise _bad_meta(source, f"describes an invalid network ({e})") from None
    classes = info.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != cfg.num_classes
                                or not all(isinstance(c, str) for c in classes)):
        raise _bad_meta(source, f"has a class list that is not {cfg.num_classes} names")
    pre = info.get("preprocess")
    if pre is not None:
        info["preprocess"] = check_preprocess(pre, cfg.in_chans, source)
    return cfg, info


def check_preprocess(pre: Any, in_chans: int, source: str) -> dict[str, Any]:
    """A "preprocess" entry (mean, std, image_size, optional resize and interpolation)
    checked: numbers where numbers belong, std > 0, sizes within MAX_IMAGE_SIZE. Returns
    it complete: resize (0: none), interpolation and in_chans filled in."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not isinstance(pre, dict):
        raise _bad_meta(source, "has a preprocess entry that is not an object")
    mean, std = pre.get("mean"), pre.get("std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == in_chans
            and all(map(number, mean + std)) and all(s > 0 for s in std)):
        raise _bad_meta(source, f"needs {in_chans} finite means and {in_chans} positive stds")
    for key, low in (("image_size", 1), ("resize", 0)):
        v = pre.get(key, 0 if key == "resize" else None)
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= MAX_IMAGE_SIZE:
            raise _bad_meta(source, f"has {key}={shown(repr(v))[:40]}, not a size from {low} "
                                    f"to {MAX_IMAGE_SIZE}")
    if pre.get("interpolation", "bilinear") not in ("bilinear", "bicubic", "nearest"):
        raise _bad_meta(source, f"has an unknown interpolation "
                                f"{shown(repr(pre.get('interpolation')))[:40]}")
    if pre.get("in_chans", in_chans) != in_chans:
        raise _bad_meta(source, f"says in_chans {shown(repr(pre.get('in_chans')))[:40]}, the "
                                f"network {in_chans}")
    # every key present, so that no reader needs a default of its own
    return {"mean": list(mean), "std": list(std), "image_size": pre["image_size"],
            "resize": pre.get("resize", 0), "interpolation": pre.get("interpolation", "bilinear"),
            "in_chans": in_chans}


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run's, or a damaged file)."""
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{source}: {k} holds NaN or infinite values; the weights are "
                            f"unusable (a diverged training run?)")


def load_weights_into(model: ResNet, weights: dict[str, torch.Tensor], source: str,
                      check_only: bool = False) -> None:
    """Strict load with one message naming what does not fit (check_only: only compare)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    shape = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in weights and weights[k].shape != own[k].shape]
    if missing or extra or shape:
        parts = []
        if shape:
            parts.append("shape mismatch: " + "; ".join(shape[:3]))
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if extra:
            parts.append(f"unexpected {len(extra)} keys (e.g. {extra[0]})")
        raise UserError(f"checkpoint {source} does not fit this model: " + ", ".join(parts))
    if not check_only:
        model.load_state_dict(weights, strict=True)


def load_model(path: str | Path) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights."""
    cfg, weights, info = read_checkpoint(path)
    model = ResNet(cfg)
    load_weights_into(model, weights, str(path))
    return model.eval(), info
