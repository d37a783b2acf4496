"""Batched augmentation on tensors (no torchvision): every op takes a float batch
(N, C, H, W) and a torch.Generator, so a run is reproducible from its seed."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pad_random_crop(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad` and crop back to H x W at a random offset per sample."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * pad)
    xp = xp.gather(2, rows)
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return xp.gather(3, cols)


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=g) < p
    return flip_where(x, flip)


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """The images of batch x mirrored left to right where the boolean vector `flip` is set."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_resized_crop(x: torch.Tensor, size: int, g: torch.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Inception-style crop: area fraction in `scale`, aspect ratio in `ratio` (log-uniform),
    resized to size x size, via one batched affine resampling (bilinear)."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=g)
    logr = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    r = torch.exp(logr)
    sw = torch.sqrt(area * r).clamp(max=1.0)   # crop width / image width
    sh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - sw)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - sh)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sw, cx, sh, cy
    grid = F.affine_grid(theta, (n, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", align_corners=False)


def resize_center_crop(x: torch.Tensor, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """Eval transform: resize the shorter side to size / crop_fraction, crop the centre."""
    h, w = x.shape[-2:]
    short = round(size / crop_fraction)
    if (h, w) != (short, short) or short != size:
        s = short / min(h, w)
        x = F.interpolate(x, size=(max(short, round(h * s)), max(short, round(w * s))),
                          mode="bilinear", align_corners=False, antialias=True)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def random_erasing(x: torch.Tensor, g: torch.Generator, p: float = 0.5,
                   scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Zhong et al. 2017: with probability p, replace a random rectangle with noise."""
    n, c, h, w = x.shape
    area = torch.empty(n).uniform_(*scale, generator=g) * h * w
    r = torch.exp(torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g))
    eh = torch.sqrt(area * r).round().clamp(1, h)
    ew = torch.sqrt(area / r).round().clamp(1, w)
    top = (torch.rand(n, generator=g) * (h - eh + 1)).floor()
    left = (torch.rand(n, generator=g) * (w - ew + 1)).floor()
    on = torch.rand(n, generator=g) < p
    ys, xs = torch.arange(h)[None, :], torch.arange(w)[None, :]
    mask = ((ys >= top[:, None]) & (ys < (top + eh)[:, None]))[:, :, None] & \
           ((xs >= left[:, None]) & (xs < (left + ew)[:, None]))[:, None, :] & on[:, None, None]
    erased = on.nonzero().flatten()  # noise drawn for these images only (a p-th of the batch)
    out = x.clone()
    noise = torch.randn((len(erased), c, h, w), generator=g, dtype=x.dtype)
    out[erased] = torch.where(mask[erased][:, None], noise, x[erased])
    return out


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
