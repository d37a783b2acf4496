"""Fine-tuning: start from weights (a registry tag, a foreign file or a run), freeze parts
of the network, freeze BatchNorm, and train the new head faster than the backbone."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError
from ..layers import FrozenBatchNorm2d
from ..model import ResNet
from ..untrusted import shown
from ..weights.sources import load_into, read_source

# What --freeze names: the stem (conv1 and bn1, or the deep stem), each stage, or everything
# but the classifier.
PARTS = ("stem", "layer1", "layer2", "layer3", "layer4", "backbone")


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d inside `module` with a FrozenBatchNorm2d; returns how many."""
    n = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d.from_bn(child))
            n += 1
        else:
            n += freeze_batchnorm(child)
    return n


def _modules(model: ResNet, part: str) -> list[nn.Module]:
    if part == "stem":
        return [model.conv1, model.bn1]
    if part == "backbone":
        return [m for n, m in model.named_children() if n != "fc"]
    return [getattr(model, part)]


def freeze(model: ResNet, parts: list[str]) -> int:
    """Stop gradients to the named parts (see PARTS); returns the number of frozen
    parameters. Their BatchNorm layers keep running in train mode unless frozen too."""
    bad = [p for p in parts if p not in PARTS or (p.startswith("layer") and not hasattr(model, p))]
    if bad:
        raise UserError(f"cannot freeze {', '.join(bad)}: choose from {', '.join(PARTS)}")
    n = 0
    for part in parts:
        for m in _modules(model, part):
            for p in m.parameters():
                n += p.numel() if p.requires_grad else 0
                p.requires_grad_(False)
    return n


def start_from(model: ResNet, source: str, classes: list[str] | None = None) -> dict[str, Any]:
    """Load `source` (registry tag, weights file, resnetkit checkpoint or run folder) into
    the model; a head of another size starts fresh, and so does a head of the same size
    whose classes (by name, where the source names them) are not `classes`. Returns the
    source's metadata (its "preprocess" when it has one)."""
    state, kind, info, _ = read_source(source)
    theirs = info.get("classes")
    other = (classes is not None and isinstance(theirs, list) and len(theirs) == len(classes)
             and list(theirs) != list(classes))
    why = None
    if other:  # the names came from a file: escaped before they are shown
        names = ", ".join(shown(str(c)) for c in theirs[:3]) + (", ..." if len(theirs) > 3 else "")
        why = f"its head answers other classes ({names})"
    load_into(model, state, source, kind, fresh_head=why)
    return info
