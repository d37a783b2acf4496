"""ResNet built from a ResNetConfig, with timm's feature API and torchvision's names."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import BLOCK_TYPES, ResidualBlock, conv3x3
from .config import ResNetConfig
from .errors import UserError
from .geometry import check_input, min_input_size


class ResNet(nn.Module):
    """A ResNet of any configuration `cfg`. With features_only, a backbone without classifier
    whose forward returns the feature maps (stem and every stage) selected by out_indices."""

    def __init__(self, cfg: ResNetConfig, features_only: bool = False,
                 out_indices: tuple[int, ...] | None = None):
        super().__init__()
        self.cfg = cfg
        w = cfg.stem_width
        if cfg.stem == "deep":
            h = w // 2
            self.conv1 = nn.Sequential(
                conv3x3(cfg.in_chans, h, 2), nn.BatchNorm2d(h), nn.ReLU(inplace=True),
                conv3x3(h, h), nn.BatchNorm2d(h), nn.ReLU(inplace=True), conv3x3(h, w))
        elif cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.in_chans, w, 7, 2, 3, bias=False)
        else:
            self.conv1 = conv3x3(cfg.in_chans, w)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = (nn.Identity() if cfg.stem == "cifar"
                        else nn.MaxPool2d(3, 2, cfg.maxpool_padding))
        self.feature_info = [dict(num_chs=w, reduction=1 if cfg.stem == "cifar" else 2,
                                  module="relu")]
        block_cls = BLOCK_TYPES[cfg.block]
        target = cfg.output_stride or cfg.natural_stride
        in_chs, reduction, dilation = w, cfg.stem_stride, 1
        n_blocks, idx = sum(cfg.layers), 0
        self.stage_names: list[str] = []
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
            self.stage_names.append(name)
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=name))
        self.num_features = in_chs
        # Pre-activation nets end with BN+ReLU, as no block normalises its own output.
        self.norm = nn.BatchNorm2d(in_chs) if cfg.preact else nn.Identity()
        self.final_act = nn.ReLU(inplace=True) if cfg.preact else nn.Identity()

        self.features_only = features_only
        self.out_indices = tuple(range(len(self.feature_info))) if out_indices is None \
            else tuple(out_indices)
        bad = [i for i in self.out_indices if not 0 <= i < len(self.feature_info)]
        if bad:
            raise UserError(f"out_indices {bad} out of range: this network has feature "
                            f"levels 0..{len(self.feature_info) - 1}")
        if features_only:
            self.feature_info = [self.feature_info[i] for i in self.out_indices]
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.reset_classifier(cfg.num_classes)
        self._init_weights()
        self.min_input_size = min_input_size(self)

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

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a fresh one for num_classes outputs (0: none)."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def _stages(self, x: torch.Tensor, keep: set[int]) -> dict[int, torch.Tensor]:
        """{level: feature map} for the levels in `keep` (0: stem before max-pool, i: stage i,
        the last one normalised in a pre-activation net), by the one stage loop."""
        if not torch.jit.is_tracing():
            check_input(self, x)
        x = self.forward_stem(x)
        feats = {0: x} if 0 in keep else {}
        x = self.maxpool(x)
        for i, name in enumerate(self.stage_names, 1):
            x = getattr(self, name)(x)
            if i == len(self.stage_names):
                x = self.final_act(self.norm(x))
            if i in keep:
                feats[i] = x
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final feature map, before pooling: (N, num_features, H/32, W/32) on ImageNet."""
        last = len(self.stage_names)
        return self._stages(x, {last})[last]

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps at self.out_indices: 0 is the stem (before max-pool), i the i-th stage."""
        feats = self._stages(x, set(self.out_indices))
        return [feats[i] for i in self.out_indices]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool and classifier; pre_logits=True stops before the fc."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor):
        if self.features_only:
            return self.forward_intermediates(x)
        return self.forward_head(self.forward_features(x))
