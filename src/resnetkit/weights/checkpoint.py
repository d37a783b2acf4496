"""Checkpoints: weights as safetensors (self-describing: architecture, classes and
preprocessing in its metadata) plus training state read with torch.load(weights_only=True).
Every file is written atomically: temporary file, fsync, rename."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..config import ResNetConfig
from ..errors import UserError
from ..model import ResNet


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(tmp_path)`, fsync, then rename over `path`; on any error the old
    file stays untouched and the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
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


def save_weights(path: Path, model: ResNet, meta: dict[str, Any]) -> None:
    """The model's state_dict plus metadata: "resnet_config", "classes", "preprocess"."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    header = {"resnet_config": json.dumps(config_to_dict(model.cfg)),
              **{k: json.dumps(v) for k, v in meta.items()}}
    try:
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None


def save_state(path: Path, state: dict[str, Any]) -> None:
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except OSError as e:
        raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None


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


def read_checkpoint(path: str | Path) -> tuple[ResNetConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(architecture, weights, metadata) of a .safetensors checkpoint or a run folder
    (its best, else last, checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).exists():
                path = path / name
                break
        else:
            raise UserError(f"{path} holds no best.safetensors or last.safetensors")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        weights = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a safetensors checkpoint ({e})") from None
    if "resnet_config" not in meta:
        raise UserError(f"{path} has no resnet_config metadata: not written by resnetkit; load "
                        f"its weights into a model you build with create_model instead")
    info = {k: json.loads(v) for k, v in meta.items()}
    cfg = ResNetConfig(**info.pop("resnet_config"))
    return cfg, weights, info


def load_weights_into(model: ResNet, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one message naming what does not fit."""
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
    model.load_state_dict(weights, strict=True)


def load_model(path: str | Path) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights."""
    cfg, weights, info = read_checkpoint(path)
    model = ResNet(cfg)
    load_weights_into(model, weights, str(path))
    return model.eval(), info
