"""torch.hub entry points: one per resnetkit preset.

    model = torch.hub.load("<owner>/resnetkit", "resnet50", pretrained=True)
    model = torch.hub.load("/path/to/resnetkit", "resnet20", source="local", num_classes=10)

Each entry is resnetkit.create_model(<preset>, pretrained=..., **kwargs): `pretrained` is
False, True (the preset's default published weights) or a weights tag; other keyword
arguments are config fields (num_classes, in_chans, drop_rate, ...) or features_only /
out_indices."""
import os
import sys

dependencies = ["torch", "numpy", "PIL", "safetensors"]

# torch.hub imports this file from the repository root; the package lives under src/
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from resnetkit.weights.sources import create_model as _create_model  # noqa: E402
from resnetkit.zoo import PRESETS as _PRESETS  # noqa: E402


def _entry(name: str):
    def entry(pretrained=False, **kwargs):
        return _create_model(name, pretrained=pretrained, **kwargs)
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"resnetkit preset {name!r}: {_PRESETS[name]}.\n\n"
                     f"pretrained: False, True (the default published weights) or a tag; "
                     f"other keyword arguments override the config.")
    return entry


# torch.hub lists and finds entries with dir() and getattr() on this module (PEP 562)
def __getattr__(name: str):
    if name in _PRESETS:
        return _entry(name)
    raise AttributeError(name)


def __dir__():
    return sorted(set(globals()) | set(_PRESETS))
