"""Foreign checkpoint files: torchvision's and timm's (.pth, .bin, .safetensors) and
PaddlePaddle's (.pdparams), read safely and mapped onto resnetkit's parameter names.

All the name mapping lives here. resnetkit's names are torchvision's, and timm's ResNets use
the same names (deep stem conv1.0/1/3/4/6, avg-down shortcut downsample.0/1/2 included), so
torchvision and timm files need no renaming. timm's ResNetV2 (resnetv2_*) names its modules
otherwise: stem.conv (or stem.conv1/norm1/conv2/norm2/conv3), stages.i.blocks.j.normK/convK,
downsample.conv, norm, and a 1x1-conv classifier head.fc; they are renamed here. PaddlePaddle's `paddle.vision.models` ResNet uses
the same module names too, but stores BatchNorm statistics as `_mean`/`_variance` and the fc
weight as [in, out] (Paddle's Linear computes x @ W). Files written before PyTorch 0.4.1
(torchvision's first ResNet weights) lack BatchNorm's `num_batches_tracked`, which is filled
with 0.

Nothing is unpickled beyond tensors and arrays: .pth/.bin go through
torch.load(weights_only=True), and .pdparams (a pickle of numpy arrays) through an unpickler
that admits only numpy arrays, dtypes and plain containers.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from ..untrusted import regular_file, restricted_unpickle, shown

_PADDLE_BN = {"_mean": "running_mean", "_variance": "running_var"}
# timm resnetv2's stem modules -> resnetkit's (timm/models/resnetv2.py, create_resnetv2_stem)
_V2_STEM = {"conv": "conv1", "norm": "bn1", "conv1": "conv1.0", "norm1": "conv1.1",
            "conv2": "conv1.3", "norm2": "conv1.4", "conv3": "conv1.6", "norm3": "bn1"}
SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".pdparams")


def read_pdparams(path: str | Path) -> dict[str, torch.Tensor]:
    """A PaddlePaddle parameter file (paddle.save of a state_dict) as float tensors, with no
    code run: anything but numpy arrays and plain containers is refused."""
    try:
        data = regular_file(path, "weights file").read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    obj = restricted_unpickle(data, str(path))
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, not a dict of parameters")
    obj.pop("StructuredToParameterName@@", None)  # paddle.save's name table, not a parameter
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, np.ndarray) or v.dtype == object:
            raise UserError(f"{path}: entry {k!r} is not a numeric array")
        out[k] = torch.from_numpy(np.ascontiguousarray(v))
    return out


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a training checkpoint ({"state_dict": ...}, {"model": ...})."""
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise UserError(f"{path} holds no state_dict of tensors under parameter names")
    # DataParallel/DDP and timm's EMA prefixes
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(tensors, publisher format: "torch" or "paddle") of a weights file of any supported
    kind. Raises UserError for a missing, unreadable or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no weights file at {path}")
    if path.suffix == ".pdparams":
        return read_pdparams(path), "paddle"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), "torch"
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a safetensors file ({e})") from None
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            with warnings.catch_warnings():  # torch's note on pickle protocols
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # refused unpickling or a damaged file
            raise UserError(f"{path} cannot be read as PyTorch weights: it is damaged, not a "
                            f"weights file, or holds objects other than tensors (which are "
                            f"never unpickled)") from None
        return _unwrap(obj, path), "torch"
    raise UserError(f"{path}: unknown weights format {path.suffix!r}; supported: "
                    f"{', '.join(SUFFIXES)}")


def _from_timm_v2(k: str, v: torch.Tensor, avg_down: bool) -> tuple[str, torch.Tensor]:
    """One timm ResNetV2 entry under resnetkit's name (and the head's conv as a Linear)."""
    parts = k.split(".")
    if parts[0] == "stem":
        return f"{_V2_STEM.get(parts[1], parts[1])}.{'.'.join(parts[2:])}", v
    if parts[0] == "head" and parts[1] == "fc":
        return f"fc.{parts[2]}", v.flatten(1) if v.dim() == 4 else v
    if parts[0] == "stages" and len(parts) > 4 and parts[2] == "blocks":
        rest = parts[4:]
        if rest[0] == "downsample":  # DownsampleConv: conv, norm; DownsampleAvg: pool first
            rest = ["downsample", str({"conv": 0, "norm": 1}.get(rest[1], 0) + avg_down)] + rest[2:]
        else:
            rest[0] = rest[0].replace("norm", "bn")
        return ".".join([f"layer{int(parts[1]) + 1}", parts[3]] + rest), v
    return k, v


def _is_v2_name(k: str) -> bool:
    try:
        _from_timm_v2(k, torch.empty(0), False)
        return True
    except (IndexError, ValueError):
        return False


def to_resnetkit(state: dict[str, torch.Tensor], kind: str,
                 reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A foreign state_dict under resnetkit's names. `reference` is the target model's own
    state_dict (for the buffers older files lack)."""
    out = {}
    if any(k.startswith("stages.") for k in state):  # timm's ResNetV2
        # avg-down shortcuts (a pool before the conv): the target says, else timm's "d"
        # variants, the ones with the deep stem
        avg_down = any(k.endswith("downsample.1.weight") and v.dim() == 4
                       for k, v in reference.items()) if reference else "stem.conv1.weight" in state
        try:
            state = dict(_from_timm_v2(k, v, avg_down) for k, v in state.items())
        except (IndexError, ValueError):  # a key cut short, or a stage that is no number
            odd = next(k for k in state if not _is_v2_name(k))
            raise UserError(f"the weights name {shown(repr(odd))[:120]}, which is not a timm "
                            f"ResNetV2 parameter name; the file is damaged or of another "
                            f"architecture") from None
    for k, v in state.items():
        if kind == "paddle":
            head, _, leaf = k.rpartition(".")
            k = f"{head}.{_PADDLE_BN.get(leaf, leaf)}" if head else k
            if k.endswith("fc.weight") and v.dim() == 2:
                v = v.t()
        out[k] = v.float() if v.is_floating_point() else v
    for k, v in reference.items():
        if k.endswith("num_batches_tracked") and k not in out:
            out[k] = torch.zeros_like(v)
    return out


def guess_preset(state: dict[str, torch.Tensor]) -> str | None:
    """The preset whose parameter names and shapes a state_dict matches exactly (the head may
    have any number of classes), or None."""
    from ..zoo import PRESETS, create_model
    shapes = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    stem = shapes.get("conv1.weight") or shapes.get("conv1.0.weight")
    if stem is None or len(stem) != 4:
        return None
    n_cls = shapes.get("fc.weight", (0,))[0]
    for name in PRESETS:
        with torch.device("meta"):
            own = create_model(name, num_classes=n_cls, in_chans=stem[1]).state_dict()
        if {k: tuple(v.shape) for k, v in own.items()
                if not k.endswith("num_batches_tracked")} == shapes:
            return name
    return None
