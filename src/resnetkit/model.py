"""ResNet built from a ResNetConfig, with torchvision's names and timm's model API."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .blocks import BLOCK_TYPES, ResidualBlock
from .config import MAX_CLASSES, ResNetConfig
from .errors import UserError
from .features import FeatureInfo, feature_take_indices, is_exporting
from .geometry import check_input, min_input_size
from .layers import GlobalPool, checkpoint_stage, conv3x3, make_norm

# ImageNet statistics (torchvision's and timm's default for these nets)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ResNet(nn.Module):
    """A ResNet of any configuration `cfg`. With features_only, a backbone without classifier
    whose forward returns the feature maps (stem and every stage) selected by out_indices."""

    __jit_unused_properties__ = ["default_cfg", "global_pool"]

    def __init__(self, cfg: ResNetConfig, features_only: bool = False,
                 out_indices: tuple[int, ...] | None = None):
        super().__init__()
        self.cfg = cfg
        info = self._stem(cfg)
        block_cls = BLOCK_TYPES[cfg.block]
        target = cfg.output_stride or cfg.natural_stride
        in_chs, reduction, dilation = cfg.stem_width, cfg.stem_stride, 1
        n_blocks, idx = sum(cfg.layers), 0
        names = []
        for i, (n, planes) in enumerate(zip(cfg.layers, cfg.widths)):
            stride, first_dilation = (1 if i == 0 else 2), dilation
            if reduction * stride > target:  # past the output stride: dilate instead
                dilation, stride = dilation * stride, 1
            reduction *= stride
            out_chs = planes * cfg.block_expansion
            blocks = []
            for j in range(n):
                blocks.append(block_cls(cfg, in_chs, planes, stride if j == 0 else 1, dilation,
                                        first_dilation if j == 0 else dilation,
                                        cfg.drop_path_rate * idx / max(n_blocks - 1, 1)))
                in_chs, idx = out_chs, idx + 1
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            names.append(name)
            info.append(dict(num_chs=out_chs, reduction=reduction, module=name))
        self.stage_names = names
        self.num_features = in_chs
        # Pre-activation nets end with BN+ReLU, as no block normalises its own output.
        self.norm = make_norm(cfg.norm_layer, in_chs) if cfg.preact else nn.Identity()
        self.final_act = nn.ReLU(inplace=True) if cfg.preact else nn.Identity()

        self.features_only = features_only
        self.out_indices = list(range(len(info)) if out_indices is None
                                           else out_indices)
        bad = [i for i in self.out_indices if not 0 <= i < len(info)]
        if not self.out_indices:
            raise UserError(f"out_indices is empty: choose feature levels from 0 to "
                            f"{len(info) - 1} (None: all of them)")
        if bad:
            raise UserError(f"out_indices {bad} out of range: this network has feature "
                            f"levels 0..{len(info) - 1}")
        self.feature_info = FeatureInfo(info, self.out_indices)
        self.grad_checkpointing = False
        self.drop_rate = cfg.drop_rate
        # a features_only backbone keeps a pass-through head, so every forward compiles
        self.reset_classifier(0 if features_only else cfg.num_classes,
                              "" if features_only else cfg.global_pool)
        self.pretrained_cfg = self._default_cfg()
        self._init_weights()
        self.min_input_size = min_input_size(self)

    def _stem(self, cfg: ResNetConfig) -> list[dict[str, Any]]:
        """conv1 (7x7, three 3x3 for the deep stem, one 3x3 for the CIFAR stems), bn1, relu
        and the max-pool (none for "cifar", 2x2 for "cifar_pool"); returns the feature_info
        entry of the stem's output."""
        w, norm = cfg.stem_width, cfg.norm_layer
        if cfg.stem == "deep":
            h = w // 2
            self.conv1 = nn.Sequential(
                conv3x3(cfg.in_chans, h, 2), make_norm(norm, h), nn.ReLU(inplace=True),
                conv3x3(h, h), make_norm(norm, h), nn.ReLU(inplace=True), conv3x3(h, w))
        elif cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.in_chans, w, 7, 2, 3, bias=False)
        else:
            self.conv1 = conv3x3(cfg.in_chans, w)
        self.bn1 = make_norm(norm, w) if cfg.stem_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True) if cfg.stem_norm else nn.Identity()
        pools = {"cifar": nn.Identity, "cifar_pool": lambda: nn.MaxPool2d(2, 2)}
        self.maxpool = pools.get(cfg.stem, lambda: nn.MaxPool2d(3, 2, cfg.maxpool_padding))()
        info = [dict(num_chs=w, reduction=1 if cfg.stem.startswith("cifar") else 2,
                     module="relu" if cfg.stem_norm else "conv1")]
        return info

    def _default_cfg(self) -> Dict[str, Any]:
        """timm's pretrained_cfg for an untrained net: its input and ImageNet preprocessing
        (weights loaded through resnetkit.create_model replace it with theirs)."""
        size, c = (32 if self.cfg.stem.startswith("cifar") else 224), self.cfg.in_chans
        # other channel counts: the average statistic on every channel (timm's choice for 1)
        mean, std = ((IMAGENET_MEAN, IMAGENET_STD) if c == 3 else
                     ((sum(IMAGENET_MEAN) / 3,) * c, (sum(IMAGENET_STD) / 3,) * c))
        return dict(tag=None, url="", num_classes=self.num_classes,
                    input_size=(c, size, size),
                    pool_size=(size // self.cfg.natural_stride,) * 2, crop_pct=0.875,
                    crop_mode="center", interpolation="bilinear", mean=mean, std=std,
                    first_conv="conv1.0" if self.cfg.stem == "deep" else "conv1",
                    classifier="fc")

    @property
    def default_cfg(self) -> Dict[str, Any]:
        return self.pretrained_cfg

    @property
    def global_pool(self) -> GlobalPool:
        """The head's pool (timm's name; torchvision's is avgpool)."""
        return self.avgpool

    def _init_weights(self) -> None:
        # He et al.'s init for the convs; BN layers start at weight 1, bias 0 (their default)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cfg.zero_init_residual:
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    nn.init.zeros_(m.residual_end().weight)

    def blocks(self) -> list[nn.Module]:
        """All residual blocks, in order."""
        return [b for name in self.stage_names for b in getattr(self, name)]

    # timm's model API
    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """A fresh classifier for num_classes outputs (0: none) after the given global pool
        ("avg", "max", "avgmax", "catavgmax"; "" keeps the map, with num_classes=0 only)."""
        if global_pool not in ("avg", "max", "avgmax", "catavgmax", ""):
            raise UserError(f"unknown global_pool {global_pool!r}: choose avg, max, avgmax, "
                            f"catavgmax or '' (none)")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or \
                not 0 <= num_classes <= MAX_CLASSES:
            raise UserError(f"num_classes must be a whole number from 0 (no classifier) to "
                            f"{MAX_CLASSES:,}, got {num_classes!r}")
        if not global_pool and num_classes:
            raise UserError("global_pool '' (no pooling) needs num_classes=0: a classifier "
                            "needs pooled features")
        self.avgpool = GlobalPool(global_pool)
        pooled = self.num_features * self.avgpool.feat_mult()
        self.fc = nn.Linear(pooled, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations
        (training memory for compute); BN running statistics are still updated once."""
        self.grad_checkpointing = enable

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript compiles no further than this)
            if fused.active() and isinstance(self.relu, nn.ReLU):
                return fused.norm_act(self.bn1, self.conv1(x))  # falls back where it must
        return self.relu(self.bn1(self.conv1(x)))

    def _run(self, x: torch.Tensor, take: List[int], last: int, stop_early: bool,
             norm: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The one stage loop: (output, the maps at levels `take`; 0 is the stem before the
        max-pool, i stage i). Stops after level `last` with stop_early; the final norm of a
        pre-activation net applies to the output, and to its level if `norm`."""
        if not torch.jit.is_scripting():
            if not is_exporting():  # the clear error for eager users
                check_input(self, x)
        feats: List[torch.Tensor] = []
        if not torch.jit.is_scripting():  # (TorchScript compiles no further than this)
            if fused.active() and 0 not in take and isinstance(self.relu, nn.ReLU):
                # the stem's BN, ReLU and max-pool in one kernel where it applies
                x = fused.norm_act_pool(self.bn1, self.conv1(x), self.maxpool)
            else:
                x = self.forward_stem(x)
                feats = [x] if 0 in take else []
                x = fused.pool(self.maxpool, x)  # the module's own outside fused_norm_act
        else:
            x = self.forward_stem(x)
            feats = [x] if 0 in take else []
            x = self.maxpool(x)
        level, n = 0, len(self.stage_names)
        for name, stage in self.named_children():  # scriptable: no getattr by name
            if name in self.stage_names and (not stop_early or level < last):
                level += 1
                if not torch.jit.is_scripting() and self.grad_checkpointing and self.training:
                    x = checkpoint_stage(stage, x)
                else:
                    x = stage(x)
                if level == n:
                    normed = self.final_act(self.norm(x))
                    if level in take:
                        feats.append(normed if norm else x)
                    x = normed
                elif level in take:
                    feats.append(x)
        return x, feats

    def forward_intermediates(self, x: torch.Tensor,
                              indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's forward_intermediates: (final features, [maps at the levels asked]) or the
        maps alone. indices: None (all levels), an int n (the last n) or a list (negative
        from the end); level 0 is the stem before the max-pool, level i stage i. norm: apply
        a pre-activation net's final norm to the last stage's map."""
        if output_fmt != "NCHW":
            raise UserError(f"output_fmt {output_fmt!r} is not available: ResNets give NCHW")
        take, last = feature_take_indices(len(self.stage_names) + 1, indices)
        out, feats = self._run(x, take, last, stop_early, norm)
        if intermediates_only:
            return feats
        return out, feats

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the stages after the last level asked for (and the head): timm's API."""
        take, last = feature_take_indices(len(self.stage_names) + 1, indices)
        for name in self.stage_names[last:]:
            setattr(self, name, nn.Identity())
        if prune_norm:
            self.norm, self.final_act = nn.Identity(), nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map, before pooling: (N, num_features, H/32, W/32) on ImageNet."""
        return self._run(x, [], 0, False, False)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout (drop_rate) and classifier; pre_logits=True stops before
        the fc."""
        x = self.avgpool(x)
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.features_only:
            return self._run(x, self.out_indices, max(self.out_indices), True, False)[1]
        return self.forward_head(self.forward_features(x))
