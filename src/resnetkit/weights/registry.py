"""The published ImageNet-1k checkpoints resnetkit knows, as data: where each file is, how to
check it, what it scored, and the preprocessing it expects.

Sources (facts copied, with the publishers' own numbers):
- torchvision: torchvision/models/resnet.py (pytorch/vision), the `*_Weights` enums: URL (its
  file name ends in the first 8 hex digits of the file's SHA-256), acc@1/acc@5 on the
  ImageNet-1k validation set, num_params, _file_size, transforms (ImageClassification:
  resize_size, crop_size, bilinear, ImageNet mean/std), recipe. License: BSD-3-Clause.
- timm: timm/models/resnet.py (huggingface/pytorch-image-models) default_cfgs (hf_hub_id,
  crop_pct, interpolation, input size, mean/std) and results/results-imagenet.csv for top-1 and
  top-5 at the model's test size; files on the Hugging Face hub. License: Apache-2.0.
- PaddlePaddle: python/paddle/vision/models/resnet.py (PaddlePaddle/Paddle) model_urls, each
  URL paired with the file's MD5. License: Apache-2.0.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..model import IMAGENET_MEAN, IMAGENET_STD

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD  # all three publishers use ImageNet's statistics


@dataclass(frozen=True)
class Weights:
    """One published checkpoint."""

    tag: str                    # "<preset>.<weights>", e.g. resnet50.tv2_in1k
    preset: str                 # the resnetkit preset whose architecture it fits
    publisher: str              # torchvision | timm | paddle
    url: str
    hash: str | None            # see hash_kind
    hash_kind: str | None       # sha256 | sha256_prefix | md5 | None (not published)
    format: str                 # pth | safetensors | pdparams
    top1: float | None          # ImageNet-1k validation accuracy, %, as published
    top5: float | None
    recipe: str
    license: str
    crop: int = 224
    resize: int | None = None   # shorter side before the centre crop; None: from crop_pct
    crop_pct: float | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    size_mb: float | None = None
    default: bool = False       # the preset's weights for pretrained=True
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """The name in the cache: the publisher's file name, or the tag for hub files that
        are all called model.safetensors."""
        name = self.url.rsplit("/", 1)[-1]
        return f"{self.tag}.{self.format}" if name.startswith("model.") else name

    @property
    def resize_to(self) -> int:
        """The shorter side before the crop: `resize`, or floor(crop / crop_pct) (timm)."""
        if self.resize:
            return self.resize
        return int(self.crop / self.crop_pct) if self.crop_pct else self.crop

    def summary(self) -> dict[str, Any]:
        """The facts `resnetkit weights list` shows, as JSON-ready data."""
        return {"tag": self.tag, "preset": self.preset, "publisher": self.publisher,
                "top1": self.top1, "top5": self.top5, "size_mb": self.size_mb,
                "resize": self.resize_to, "crop": self.crop,
                "interpolation": self.interpolation, "license": self.license,
                "url": self.url, "hash": self.hash, "hash_kind": self.hash_kind,
                "recipe": self.recipe, "default": self.default}

    def eval_preprocess(self) -> dict[str, Any]:
        """The checkpoint metadata's "preprocess" entry for this publisher's eval transform."""
        return {"mean": list(self.mean), "std": list(self.std), "image_size": self.crop,
                "resize": self.resize_to, "interpolation": self.interpolation, "in_chans": 3}


def _tv(preset: str, version: int, file: str, top1: float, top5: float, size_mb: float,
        resize: int, recipe: str, default: bool = False) -> Weights:
    return Weights(f"{preset}.tv{version}_in1k", preset, "torchvision", f"https://download.pytorch.org/models/{file}",
                   file.rsplit("-", 1)[1].split(".")[0], "sha256_prefix", "pth", top1, top5,
                   recipe, "BSD-3-Clause", 224, resize, None, "bilinear", size_mb=size_mb,
                   default=default)


# torchvision 0.29.1, torchvision/models/resnet.py: (preset, version, file, acc@1, acc@5,
# _file_size MB, resize_size, recipe). V1 uses ImageClassification's default resize of 256,
# V2 (the newer recipe) 232; both crop 224, bilinear. `default` follows torchvision's
# `DEFAULT` (V2 where it exists).
_R = "https://github.com/pytorch/vision/"
_TV = [
    ("resnet18", 1, "resnet18-f37072fd.pth", 69.758, 89.078, 44.661, 256,
     _R + "tree/main/references/classification#resnet"),
    ("resnet34", 1, "resnet34-b627a593.pth", 73.314, 91.420, 83.275, 256,
     _R + "tree/main/references/classification#resnet"),
    ("resnet50", 1, "resnet50-0676ba61.pth", 76.130, 92.862, 97.781, 256,
     _R + "tree/main/references/classification#resnet"),
    ("resnet50", 2, "resnet50-11ad3fa6.pth", 80.858, 95.434, 97.79, 232,
     _R + "issues/3995#issuecomment-1013906621"),
    ("resnet101", 1, "resnet101-63fe2227.pth", 77.374, 93.546, 170.511, 256,
     _R + "tree/main/references/classification#resnet"),
    ("resnet101", 2, "resnet101-cd907fc2.pth", 81.886, 95.780, 170.53, 232,
     _R + "issues/3995#new-recipe"),
    ("resnet152", 1, "resnet152-394f9c45.pth", 78.312, 94.046, 230.434, 256,
     _R + "tree/main/references/classification#resnet"),
    ("resnet152", 2, "resnet152-f82ba261.pth", 82.284, 96.002, 230.474, 232,
     _R + "issues/3995#new-recipe"),
    ("resnext50_32x4d", 1, "resnext50_32x4d-7cdf4587.pth", 77.618, 93.698, 95.789, 256,
     _R + "tree/main/references/classification#resnext"),
    ("resnext50_32x4d", 2, "resnext50_32x4d-1a0047aa.pth", 81.198, 95.340, 95.833, 232,
     _R + "issues/3995#new-recipe"),
    ("resnext101_32x8d", 1, "resnext101_32x8d-8ba56ff5.pth", 79.312, 94.526, 339.586, 256,
     _R + "tree/main/references/classification#resnext"),
    ("resnext101_32x8d", 2, "resnext101_32x8d-110c445d.pth", 82.834, 96.228, 339.673, 232,
     _R + "issues/3995#new-recipe-with-fixres"),
    ("resnext101_64x4d", 1, "resnext101_64x4d-173b62eb.pth", 83.246, 96.454, 319.318, 232,
     _R + "pull/5935"),
    ("wide_resnet50_2", 1, "wide_resnet50_2-95faca4d.pth", 78.468, 94.086, 131.82, 256,
     _R + "pull/912#issue-445437439"),
    ("wide_resnet50_2", 2, "wide_resnet50_2-9ba9bcbe.pth", 81.602, 95.758, 263.124, 232,
     _R + "issues/3995#new-recipe-with-fixres"),
    ("wide_resnet101_2", 1, "wide_resnet101_2-32ee1156.pth", 78.848, 94.284, 242.896, 256,
     _R + "pull/912#issue-445437439"),
    ("wide_resnet101_2", 2, "wide_resnet101_2-d733dc28.pth", 82.510, 96.020, 484.747, 232,
     _R + "issues/3995#new-recipe"),
]
_TV_DEFAULT = {(p, max(v for q, v, *_ in _TV if q == p)) for p, *_ in _TV}  # the newest

REGISTRY: dict[str, Weights] = {}


def _register(entries: list[Weights]) -> None:
    for w in entries:
        if w.tag in REGISTRY:
            raise ValueError(f"duplicate registry tag {w.tag}")  # a bug in the table
        REGISTRY[w.tag] = w


def list_weights(pattern: str = "*") -> list[Weights]:
    """Registry entries whose tag matches a shell-style pattern ("resnet50*"), or, for a bare
    architecture name ("resnet50"), every entry of that architecture (timm's
    list_pretrained("resnet50") lists its tags the same way)."""
    if not any(c in pattern for c in "*?[") and "." not in pattern:
        return [REGISTRY[t] for t in sorted(REGISTRY) if REGISTRY[t].preset == pattern]
    return [REGISTRY[t] for t in sorted(REGISTRY) if fnmatch.fnmatch(t, pattern)]


def get_weights(tag: str) -> Weights:
    """The entry for a tag; unknown tags suggest the closest ones."""
    if tag not in REGISTRY:
        import difflib
        close = difflib.get_close_matches(tag, REGISTRY, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `resnetkit weights list`"
        raise UserError(f"unknown weights tag {tag!r}; {hint}")
    return REGISTRY[tag]


def default_weights(preset: str) -> Weights:
    """The weights pretrained=True loads for a preset."""
    for w in REGISTRY.values():
        if w.preset == preset and w.default:
            return w
    raise UserError(f"no published weights for {preset}; presets with weights: "
                    f"{', '.join(sorted({w.preset for w in REGISTRY.values()}))}")


_register([_tv(p, v, f, t1, t5, mb, rs, recipe, (p, v) in _TV_DEFAULT)
           for p, v, f, t1, t5, mb, rs, recipe in _TV])

# timm (huggingface/pytorch-image-models@aa4b585, timm/models/resnet.py default_cfgs: crop_pct
# 0.95, bicubic, 224 for the "a1" tags; top-1/top-5 at 224 from results/results-imagenet.csv;
# SHA-256 and size of model.safetensors from each file's Hugging Face page). Only tags whose
# architecture is a resnetkit preset and whose file hash is published are listed.
_A1 = ("ResNet Strikes Back A1 recipe (arXiv:2110.00476): LAMB, BCE loss, cosine lr with "
       "warm-up, 600 epochs")
_TIMM = [
    ("resnet18", "a1", "80c49dee3da4822c009c5a7fe591e9223c5a2cfcf95a4067ca4dfb5a7b89c612",
     71.504, 90.086, 46.8),
    ("resnet50", "a1", "773525d5821de224f8f30c33377b7a795d7863e08522698200d3217d3f2a41bb",
     80.382, 94.598, 102.0),
    ("resnet101", "a1", "1ba5b660e7c175b3c27c557fc7dc8b2815be830c516815b0155f61b403f27380",
     81.494, 95.164, 179.0),
    ("resnet50d", "a1", "0b4f757b0732eb4c6584d2c3692923c3b92efe116b8a383fd4b5eb62fda660cb",
     80.73, 94.678, 103.0),
]
_register([Weights(f"{p}.{v}_in1k", p, "timm",
                   f"https://huggingface.co/timm/{p}.{v}_in1k/resolve/main/model.safetensors",
                   sha, "sha256", "safetensors", t1, t5, _A1, "Apache-2.0", 224, None, 0.95,
                   "bicubic", size_mb=mb, default=p == "resnet50d")
           for p, v, sha, t1, t5, mb in _TIMM])

# PaddlePaddle (python/paddle/vision/models/resnet.py model_urls with each file's MD5;
# accuracies, recipes and the eval transform, resize 256 + centre crop 224, bilinear, from
# the PaddlePaddle/hapi repository's image_classification README, scripts and
# imagenet_dataset.py). Paddle's ResNeXt and Wide ResNet files publish no accuracy: not listed.
_PADDLE = [
    ("resnet18", "cf548f46534aa3560945be4b95cd11c4", 71.72, 90.60,
     "hapi scripts/resnet18.sh: 120 epochs, batch 256, lr 0.1, cosine"),
    ("resnet34", "8d2275cf8706028345f78ac0e1d31969", 75.02, 92.31,
     "hapi scripts/resnet34.sh: 120 epochs, batch 256, lr 0.1, cosine"),
    ("resnet50", "ca6f485ee1ab0492d38f323885b0ad80", 76.27, 93.03,
     "hapi scripts/resnet50.sh: 90 epochs, batch 256, lr 0.1, piecewise decay"),
    ("resnet101", "02f35f034ca3858e1e54d4036443c92d", 78.33, 94.04,
     "hapi scripts/resnet101.sh: 90 epochs, batch 256, lr 0.1, piecewise decay"),
    ("resnet152", "7ad16a2f1e7333859ff986138630fd7a", 78.78, 94.40,
     "hapi scripts/resnet152.sh: 90 epochs, batch 256, lr 0.1, piecewise decay"),
]
_register([Weights(f"{p}.paddle_in1k", p, "paddle",
                   f"https://paddle-hapi.bj.bcebos.com/models/{p}.pdparams", md5, "md5",
                   "pdparams", t1, t5, recipe, "Apache-2.0", 224, 256)
           for p, md5, t1, t5, recipe in _PADDLE])
