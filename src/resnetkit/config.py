"""ResNetConfig: every architectural choice of a ResNet, as one validated value."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

BLOCKS = ("basic", "bottleneck", "preact_basic", "preact_bottleneck")
STEMS = ("imagenet", "cifar", "deep", "cifar_pool")
SHORTCUTS = ("A", "B", "C", "none")
NORMS = ("batchnorm", "frozen_batchnorm", "groupnorm")
POOLS = ("avg", "max", "avgmax", "catavgmax", "")  # timm's global pool types
GN_GROUPS = 32  # timm's GroupNorm default (resnet50_gn), from Wu & He 2018
# Bounds on what a config may ask for, checked before anything is built: far above any
# published ResNet (ResNet-1202 has 200 blocks a stage, wide_resnet101_2 2,048-channel
# 3x3 convs, timm's largest heads 21,843 classes), far below what exhausts memory.
MAX_BLOCKS, MAX_WIDTH, MAX_CLASSES, MAX_IN_CHANS = 1000, 16384, 1_000_000, 1024


@dataclass(frozen=True)
class ResNetConfig:
    """The full description of a ResNet; a model is built from this and nothing else. Each
    field's comment says what it chooses; a bad value raises UserError naming the field."""

    # "basic" (two 3x3 convs), "bottleneck" (1x1-3x3-1x1), or their pre-activation forms
    # "preact_basic"/"preact_bottleneck" (ResNet v2, He et al. 2016)
    block: str = "bottleneck"
    layers: tuple[int, ...] = (3, 4, 6, 3)          # blocks per stage
    widths: tuple[int, ...] = (64, 128, 256, 512)   # "planes"; a stage outputs width x expansion
    expansion: int | None = None                    # None: 1 (basic) or 4 (bottleneck)
    # a bottleneck's 3x3 conv has int(width * width_per_group / 64) * groups channels (ResNeXt,
    # Wide ResNet)
    groups: int = 1
    width_per_group: int = 64
    stride_in_1x1: bool = False     # stage stride on the first 1x1 (v1, the paper), not the 3x3
    # "imagenet" (7x7/2 conv + 3x3/2 max-pool), "cifar" (3x3/1 conv, no pooling), "deep"
    # (three 3x3 convs + max-pool, "ResNet-C"), "cifar_pool" (3x3/1 conv + 2x2/2 max-pool: the
    # stages work at half the input's side, a quarter of the CIFAR stem's cost per block)
    stem: str = "imagenet"
    stem_width: int = 64            # channels out of the stem
    maxpool_padding: int = 1        # of the stem's max-pool: 1 (torchvision) or 0
    # BN + ReLU after the stem's conv; False: the bare conv stem of timm's resnetv2 and BiT
    # (pre-activation nets only: their first block normalises its input itself)
    stem_norm: bool = True
    # "batchnorm", "frozen_batchnorm" (fixed statistics, torchvision's detection backbones) or
    # "groupnorm" (32 groups, timm's resnet50_gn)
    norm_layer: str = "batchnorm"
    # "A" zero-padded identity, "B" projection where the shape changes, "C" projection always,
    # "none": no shortcut at all, each block outputs ReLU(F(x)) (the paper's plain nets)
    shortcut: str = "B"
    avg_down: bool = False          # projections average-pool before a stride-1 1x1 ("ResNet-D")
    # total stride of the last feature map; later stages dilate instead of striding (None:
    # the natural stride, 32 ImageNet, 4 CIFAR)
    output_stride: int | None = None
    zero_init_residual: bool = False  # each residual branch starts at zero (block = identity)
    drop_path_rate: float = 0.0     # stochastic depth of the last block, linear from 0 before
    se_ratio: float = 0.0           # squeeze-and-excitation ratio, e.g. 0.0625; 0: none
    se_divisor: int = 8             # SE width rounded to a multiple of this (timm); 1: exact
    drop_rate: float = 0.0          # dropout before the classifier (timm's drop_rate)
    # the head's global pool: "avg", "max", "avgmax", "catavgmax" or "" (none, num_classes=0)
    global_pool: str = "avg"
    in_chans: int = 3
    num_classes: int = 1000         # 0: no classifier

    def __post_init__(self) -> None:
        # Lists are accepted for convenience but stored as tuples so the config stays hashable.
        for name in ("layers", "widths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("layers", "widths"):
            if not all(isinstance(n, int) and not isinstance(n, bool) for n in getattr(self, name)):
                raise UserError(f"ResNetConfig.{name}={getattr(self, name)!r} is invalid: "
                                f"need whole numbers")
        for ok, name, allowed in self._structure_rules() + self._option_rules() + self._size_rules():
            if not ok:
                raise UserError(f"ResNetConfig.{name}={getattr(self, name)!r} is invalid: "
                                f"{allowed}")

    # Each rule is (valid, field, what a valid value is); the first broken one, in this order
    # (dependency order), is the one reported.
    def _structure_rules(self) -> list[tuple[bool, str, str]]:
        """The blocks, stages, stem and shortcuts, and what a plain network may not have."""
        basic, chs = not self.is_bottleneck, self.channels if self.widths else ()
        return [
            (self.block in BLOCKS, "block", f"choose one of {', '.join(BLOCKS)}"),
            (bool(self.layers) and all(n >= 1 for n in self.layers),
             "layers", "need one positive block count per stage"),
            (len(self.widths) == len(self.layers) and all(w >= 1 for w in self.widths),
             "widths", f"need {len(self.layers)} positive widths, one per stage in layers"),
            (self.expansion is None or self.expansion >= 1, "expansion",
             "must be a positive integer or None"),
            (self.groups >= 1, "groups", "must be >= 1"),
            (self.width_per_group >= 1, "width_per_group", "must be >= 1"),
            (not basic or self.groups == 1, "groups",
             "basic blocks support only groups=1; use a bottleneck block for ResNeXt"),
            (not basic or self.width_per_group == 64, "width_per_group",
             "basic blocks support only 64; widen a basic ResNet through widths"),
            (not basic or not self.stride_in_1x1, "stride_in_1x1",
             "basic blocks have no 1x1 conv; v1/v1.5 applies to bottlenecks only"),
            (self.stem in STEMS, "stem", f"choose one of {', '.join(STEMS)}"),
            (self.stem_width >= 1 and not (self.stem == "deep" and self.stem_width % 2),
             "stem_width",
             "must be positive (and even for the deep stem, whose first convs use half)"),
            (self.maxpool_padding in (0, 1), "maxpool_padding", "choose 0 or 1"),
            (self.stem not in ("cifar", "cifar_pool") or self.maxpool_padding == 1, "maxpool_padding",
             "the cifar stems have no padded max-pool"),
            (self.shortcut in SHORTCUTS, "shortcut",
             "choose A (zero-pad), B or C (projection), or none (a plain network)"),
            (self.shortcut != "none" or not self.zero_init_residual, "zero_init_residual",
             "means nothing without shortcuts: a plain block whose last BN starts at zero "
             "outputs zeros, not its input"),
            (self.shortcut != "none" or not self.avg_down, "avg_down",
             "shapes a projection shortcut, and a plain network has none"),
            (self.shortcut != "none" or not self.drop_path_rate, "drop_path_rate",
             "drops residual branches; without a shortcut it would cut the network's only path"),
            (self.shortcut != "none" or not self.preact, "shortcut",
             "none (plain) is the paper's post-activation form: use block basic or bottleneck"),
            (not (self.avg_down and self.shortcut == "A"), "avg_down",
             "needs projection shortcuts (shortcut B or C), not A"),
            (self.shortcut != "A" or all(b >= a for a, b in zip(chs, chs[1:])), "shortcut",
             "zero-padding cannot reduce channels between stages"),
            (self.output_stride in (None, *self._strides()), "output_stride",
             f"choose one of {self._strides()} (or None) for this stem and stage count"),
        ]

    def _option_rules(self) -> list[tuple[bool, str, str]]:
        """Regularisation, normalisation, SE, pooling, the input and the classifier."""
        return [
            (0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", "must be in [0, 1)"),
            (self.stem_norm or self.preact, "stem_norm",
             "only pre-activation blocks may follow a stem without BN + ReLU"),
            (self.norm_layer in NORMS, "norm_layer", f"choose one of {', '.join(NORMS)}"),
            (self.norm_layer != "groupnorm" or all(c % GN_GROUPS == 0 for c in self.norm_widths),
             "norm_layer", f"groupnorm needs every normalised width divisible by {GN_GROUPS}"),
            (0.0 <= self.se_ratio < 1.0, "se_ratio", "must be in [0, 1); 0 disables SE"),
            (self.se_divisor >= 1, "se_divisor", "must be >= 1 (1: no rounding)"),
            (0.0 <= self.drop_rate < 1.0, "drop_rate", "must be in [0, 1)"),
            (self.global_pool in POOLS, "global_pool", f"choose one of {POOLS}"),
            (self.global_pool or not self.num_classes, "global_pool",
             "'' (no pooling) needs num_classes=0: a classifier needs pooled features"),
            (1 <= self.in_chans <= MAX_IN_CHANS, "in_chans", f"must be from 1 to {MAX_IN_CHANS}"),
            (0 <= self.num_classes <= MAX_CLASSES, "num_classes",
             f"must be from 0 (no classifier) to {MAX_CLASSES:,}"),
        ]

    def _size_rules(self) -> list[tuple[bool, str, str]]:
        """Bounds that keep a network buildable: depth and width."""
        chs = self.channels if self.widths else ()
        return [
            (max(self.layers, default=0) <= MAX_BLOCKS, "layers", f"at most {MAX_BLOCKS} blocks a stage"),
            (self.stem_width <= MAX_WIDTH, "stem_width", f"at most {MAX_WIDTH:,} channels"),
            (self.groups <= MAX_WIDTH, "groups", f"at most {MAX_WIDTH:,}"),
            (max(chs, default=0) <= MAX_WIDTH, "widths", f"a stage at most {MAX_WIDTH:,} channels wide "
             f"(widths x expansion)"),
            (max(self.norm_widths) <= MAX_WIDTH, "width_per_group",
             f"a bottleneck's 3x3 conv at most {MAX_WIDTH:,} channels (width x width_per_group "
             f"/ 64 x groups)"),
        ]

    def _strides(self) -> list[int]:
        """The output strides this stem and stage count allow."""
        natural = self.natural_stride
        return [natural >> k for k in range(len(self.layers)) if natural >> k >= self.stem_stride]

    # Derived properties: computed from the fields, never stored.
    @property
    def preact(self) -> bool:
        return self.block.startswith("preact")

    @property
    def is_bottleneck(self) -> bool:
        return self.block.endswith("bottleneck")

    @property
    def block_expansion(self) -> int:
        return self.expansion if self.expansion is not None else (4 if self.is_bottleneck else 1)

    @property
    def channels(self) -> tuple[int, ...]:
        """Output channels of each stage."""
        return tuple(w * self.block_expansion for w in self.widths)

    def bottleneck_width(self, planes: int) -> int:
        """Channels of a bottleneck's 3x3 conv (ResNeXt / Wide ResNet)."""
        return int(planes * self.width_per_group / 64) * self.groups

    @property
    def norm_widths(self) -> tuple[int, ...]:
        """The channel counts the network normalises (stem, stages)."""
        stem = (self.stem_width // 2, self.stem_width) if self.stem == "deep" else (self.stem_width,)
        inner = tuple(self.bottleneck_width(w) if self.is_bottleneck else w for w in self.widths)
        return stem + inner + self.channels

    @property
    def stem_stride(self) -> int:
        return {"cifar": 1, "cifar_pool": 2}.get(self.stem, 4)

    @property
    def natural_stride(self) -> int:
        return self.stem_stride * 2 ** (len(self.layers) - 1)

    @property
    def depth(self) -> int:
        """Weighted layers on the main path: stem convs + convs per block x blocks + fc."""
        stem = 3 if self.stem == "deep" else 1
        per_block = 3 if self.is_bottleneck else 2
        return stem + per_block * sum(self.layers) + (1 if self.num_classes else 0)
