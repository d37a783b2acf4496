"""Models that start from weights: a registry tag, a foreign file or a resnetkit checkpoint.

`create_model(name, pretrained=...)` is `zoo.create_model` plus the weights; `load_source`
gives the verbs (`predict`, `eval`, `export`) a model with its classes and preprocessing from
any of those sources."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..config import ResNetConfig
from ..data.preprocess import complete
from ..errors import UserError
from ..model import IMAGENET_MEAN, IMAGENET_STD, ResNet
from ..runtime import check_memory
from ..zoo import create_model as build, get_config
from .checkpoint import check_finite, read_checkpoint
from .download import download
from .formats import guess_preset, read_state_dict, to_resnetkit
from .registry import REGISTRY, Weights, default_weights, get_weights

# ImageNet statistics and torchvision's evaluation transform: the default for foreign files
# that carry no preprocessing of their own (torchvision's ImageClassification preset).
IMAGENET_EVAL = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "image_size": 224,
                 "resize": 256, "interpolation": "bilinear", "in_chans": 3}


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in index order: torchvision's list
    (_IMAGENET_CATEGORIES in torchvision/models/_meta.py, torchvision 0.29.1)."""
    text = resources.files("resnetkit").joinpath("weights", "imagenet_classes.json").read_text()
    return json.loads(text)


def class_names(n: int) -> list[str]:
    """ImageNet's names for a 1000-way head, else the class numbers."""
    return imagenet_classes() if n == 1000 else [str(i) for i in range(n)]


def preprocess_of(pretrained_cfg: dict[str, Any], image_size: int | None = None) -> dict[str, Any]:
    """A checkpoint's "preprocess" entry from a timm-style pretrained_cfg: resize the shorter
    side to floor(size / crop_pct) (timm's eval transform), centre-crop size, normalise."""
    c, h, _ = pretrained_cfg["input_size"]
    size = image_size or h
    return {"mean": list(pretrained_cfg["mean"]), "std": list(pretrained_cfg["std"]),
            "image_size": size, "resize": math.floor(size / pretrained_cfg["crop_pct"]),
            "interpolation": pretrained_cfg["interpolation"], "in_chans": c}


def pretrained_cfg_of(model: ResNet, preprocess: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The model's pretrained_cfg with a checkpoint's preprocessing (and tag, url...)."""
    preprocess = complete(preprocess, model.cfg.in_chans)
    size = preprocess["image_size"]
    resize = preprocess["resize"] or size
    return {**model.pretrained_cfg, **extra, "num_classes": model.num_classes,
            "input_size": (preprocess["in_chans"], size, size),
            "crop_pct": size / resize, "interpolation": preprocess["interpolation"],
            "mean": tuple(preprocess["mean"]), "std": tuple(preprocess["std"])}


def resolve_data_config(model: ResNet | None = None, source: str | Path | None = None
                        ) -> dict[str, Any]:
    """timm's data config (input_size, interpolation, mean, std, crop_pct, crop_mode) of a
    model (its pretrained_cfg) or of a checkpoint, run folder or registry tag (its own
    preprocessing): what the eval transform needs."""
    if (model is None) == (source is None):
        raise UserError("resolve_data_config takes a model or a source, one of the two")
    if source is not None:
        model = load_source(source)[0]
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {k: model.pretrained_cfg[k] for k in keys}


def fetch(tag: str, progress: bool = True) -> tuple[Weights, Path]:
    """A registry entry and its file in the cache (downloaded and checked when missing)."""
    w = get_weights(tag)
    return w, download(w.url, w.filename, w.hash, w.hash_kind, progress=progress)


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A stem conv's RGB filters for another number of input channels, as timm does: summed
    over RGB for one channel; for more, the RGB filters repeated and scaled by 3 / in_chans
    so the response to a uniform input is unchanged."""
    have = weight.shape[1]
    if in_chans == have:
        return weight
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    reps = math.ceil(in_chans / have)
    return weight.repeat(1, reps, 1, 1)[:, :in_chans] * (have / in_chans)


def _mismatch(model: ResNet, state: dict[str, torch.Tensor], source: str) -> UserError:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    looks = guess_preset(state)
    parts = ([f"first missing key {missing[0]}"] if missing else []) + \
        ([f"first unexpected key {extra[0]}"] if extra else []) + \
        ([f"{shape[0]} has shape {tuple(state[shape[0]].shape)}, the model "
          f"{tuple(own[shape[0]].shape)}"] if shape else [])
    hint = f"; the file looks like {looks}" if looks else "; the file matches no preset"
    c = model.cfg
    return UserError(f"{source} does not fit the model asked for ({c.block} blocks, layers "
                     f"{list(c.layers)}): {', '.join(parts)}{hint}")


def load_into(model: ResNet, state: dict[str, torch.Tensor], source: str,
              kind: str = "torch", fresh_head: str | None = None) -> None:
    """Load foreign or own weights into `model`: names mapped, the stem adapted to the model's
    in_chans, a head of another size (or none) left as the model has it, with a warning;
    fresh_head: why the head is left as the model has it whatever its size (warned)."""
    check_finite(state, source)
    state = to_resnetkit(state, kind, model.state_dict())
    for key in ("conv1.weight", "conv1.0.weight"):
        if key in state and state[key].dim() == 4:
            state[key] = adapt_stem(state[key], model.cfg.in_chans)
    own, full = model.state_dict(), dict(state)
    fc, mine = state.get("fc.weight"), own.get("fc.weight")
    if fc is not None and mine is None:  # a features_only model: no head to load
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    elif fc is not None and fresh_head:
        warnings.warn(f"{source}: {fresh_head}; the head starts fresh", stacklevel=3)
        state.update({k: own[k] for k in ("fc.weight", "fc.bias") if k in own})
    elif fc is not None and fc.dim() == 2 and fc.shape[1:] == mine.shape[1:] \
            and fc.shape[0] != mine.shape[0]:
        warnings.warn(f"{source}: the checkpoint's classifier has {fc.shape[0]} outputs, the "
                      f"model {mine.shape[0]}; the head starts fresh", stacklevel=3)
        state.update({k: own[k] for k in ("fc.weight", "fc.bias")})
    if set(state) != set(own) or any(own[k].shape != state[k].shape for k in own):
        raise _mismatch(model, full, source)
    model.load_state_dict(state, strict=True)


def create_model(name: str | ResNetConfig, pretrained: bool | str = False, checkpoint_path: str | Path | None = None,
                 features_only: bool = False, out_indices: tuple[int, ...] | None = None,
                 **overrides: Any) -> ResNet:
    """A preset, optionally with weights: pretrained=True (the preset's default published
    weights), a registry tag ("resnet50.tv2_in1k"), or checkpoint_path (any supported file).
    num_classes other than the checkpoint's starts a fresh head (with a warning); in_chans
    other than 3 adapts the stem's filters (summed over RGB for 1 channel)."""
    shape = {k: v for k, v in overrides.items() if k != "norm_layer"}  # a class, maybe
    check_memory(dataclasses.replace(name, **shape) if isinstance(name, ResNetConfig)
                 else get_config(name, **shape), what=str(getattr(name, "block", name)))
    model = build(name, features_only=features_only, out_indices=out_indices, **overrides)
    if checkpoint_path is not None:
        state, kind = read_state_dict(checkpoint_path)
        source = str(checkpoint_path)
    elif pretrained:
        w = default_weights(name) if pretrained is True else get_weights(str(pretrained))
        if get_config(w.preset) != get_config(name):
            raise UserError(f"weights {w.tag} are for {w.preset}, not {name}")
        w, path = fetch(w.tag)
        state, kind = read_state_dict(path)
        source = w.tag
        model.pretrained_cfg = pretrained_cfg_of(model, w.eval_preprocess(), tag=w.tag,
                                                 url=w.url, license=w.license)
    else:
        return model
    load_into(model, state, source, kind)
    return model


def load_source(source: str | Path) -> tuple[ResNet, dict[str, Any]]:
    """(model in eval mode, {"classes", "preprocess"}) from a resnetkit checkpoint or run
    folder, a registry tag, or a torchvision/timm/Paddle weights file (its preset guessed
    from the names and shapes; ImageNet classes and torchvision's eval preprocessing)."""
    state, kind, info, cfg = read_source(source)
    if cfg is None:  # a foreign file: the preset its names and shapes fit
        mapped = to_resnetkit(state, kind, {})
        preset = guess_preset(mapped)
        if preset is None:
            raise UserError(f"{source} matches no preset's parameter names and shapes; load "
                            f"it with create_model(NAME, checkpoint_path=...) to see what differs")
        n_cls = mapped["fc.weight"].shape[0] if "fc.weight" in mapped else 0
        cfg = get_config(preset, num_classes=n_cls)
        info = {"classes": class_names(n_cls), "preprocess": dict(IMAGENET_EVAL)}
    model = ResNet(cfg)
    load_into(model, state, str(source), kind)
    if "preprocess" in info:
        model.pretrained_cfg = pretrained_cfg_of(model, info["preprocess"], tag=str(source))
    return model.eval(), info


def read_source(source: str | Path
                ) -> tuple[dict[str, torch.Tensor], str, dict[str, Any], ResNetConfig | None]:
    """(state_dict, format kind, metadata, architecture or None) of a registry tag, a
    resnetkit checkpoint or run folder (its best, else last, weights), or a foreign weights
    file (whose architecture is not known)."""
    path = Path(source)
    if str(source) in REGISTRY and not path.exists():
        w, file = fetch(str(source))
        state, kind = read_state_dict(file)
        return state, kind, {"classes": imagenet_classes(),
                             "preprocess": w.eval_preprocess()}, get_config(w.preset)
    if path.is_dir() or path.suffix == ".safetensors":
        try:
            cfg, weights, info = read_checkpoint(path)
            return weights, "torch", info, cfg
        except UserError as e:
            if "resnet_config" not in str(e):
                raise
    if not path.exists():
        raise UserError(f"{source} is neither a file, a run folder nor a registry tag "
                        f"(see `resnetkit weights list`)")
    state, kind = read_state_dict(path)
    return state, kind, {}, None


def convert(source: str | Path, output: str | Path) -> Path:
    """Write any weights source (tag, foreign file, checkpoint) as a resnetkit checkpoint:
    safetensors with the architecture, classes and preprocessing in its metadata, so that
    `eval`, `predict` and `export` take it."""
    from .checkpoint import save_weights
    output = Path(output)
    if output.suffix != ".safetensors":
        raise UserError(f"the converted checkpoint is a .safetensors file, not {output.name}")
    if not output.parent.is_dir():
        raise UserError(f"cannot write {output}: folder {output.parent} does not exist")
    if Path(source).exists() and output.resolve() == Path(source).resolve():
        raise UserError(f"{output} is the file being converted; choose another name with -o")
    model, info = load_source(source)
    save_weights(output, model, {k: info[k] for k in ("classes", "preprocess") if k in info})
    return output
