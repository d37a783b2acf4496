"""Layer responses, the ResNet paper's figure 7: the standard deviation of every 3x3 layer's
output, after BN and before the nonlinearity (and, in a residual block, before the
addition), over test images. The paper found them smaller in ResNets than in plain nets,
and smaller still in deeper ResNets: the residual functions are closer to zero."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from ..evaluate import open_eval, preprocess
from ..untrusted import shown
from ..weights import atomic_write

CONVENTION = ("std of every element of the layer's output (after BN, before ReLU and the "
              "addition) over the test images, accumulated in float64")


def three_by_three_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, BN) of every BN that normalises a 3x3 conv's output, in forward order: the
    stem's where its conv is 3x3 (the CIFAR stem), each block's after its 3x3 convs (both of
    a basic block's, a bottleneck's middle one)."""
    out = []
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (3, 3) and \
            isinstance(getattr(model, "bn1", None), nn.BatchNorm2d):
        out.append(("bn1", model.bn1))
    for block_name, block in model.named_modules():
        if not hasattr(block, "downsample") or getattr(block, "preact", False):
            continue
        for i in (1, 2, 3):
            conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and \
                    isinstance(bn, nn.BatchNorm2d):
                out.append((f"{block_name}.bn{i}", bn))
    return out


@torch.no_grad()
def layer_responses(model: nn.Module, images: torch.Tensor, mean, std, image_size: int = 0,
                    batch_size: int = 500) -> dict[str, float]:
    """{layer: std of its responses} over `images` (uint8 N x C x H x W, preprocessed as
    the model's checkpoint says), for the layers of three_by_three_norms."""
    layers = three_by_three_norms(model)
    if not layers:
        raise UserError("the model has no 3x3 conv followed by BatchNorm (a post-activation "
                        "ResNet or plain net is needed)")
    sums = {n: torch.zeros(3, dtype=torch.float64) for n, _ in layers}

    def hook(name):
        def record(module, inputs, output):
            o = output.detach().double()
            sums[name] += torch.stack([o.sum(), (o * o).sum(), torch.tensor(o.numel(),
                                                                              dtype=torch.float64)])
        return record
    handles = [bn.register_forward_hook(hook(n)) for n, bn in layers]
    try:
        model.eval()
        for i in range(0, len(images), batch_size):
            model(preprocess(images[i:i + batch_size], mean, std, image_size))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (s, ss, n) in sums.items():
        var = max(ss.item() / n.item() - (s.item() / n.item()) ** 2, 0.0)
        out[name] = var ** 0.5
    return out


def responses(runs: list[str | Path], out: str | Path, dataset: str | None = None,
              data_dir: str | None = None, limit: int = 0,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Figure 7 for trained runs (run folders or checkpoints of plain and residual nets):
    OUT/responses.json ({run: {"model", "layers": {name: std}, "by_layer": [...],
    "sorted": [...]}, "convention"}) and OUT/responses.png (top: by layer index; bottom:
    sorted by magnitude). The dataset is each run's own (its config.json) unless given."""
    if not runs:
        raise UserError("name one or more trained runs")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{shown(out)} is a file; --out names a folder")
    result: dict[str, Any] = {"convention": CONVENTION, "runs": {}}
    for run in runs:
        ds = dataset or _run_dataset(Path(run))
        e = open_eval(run, ds, "test", data_dir, limit)
        say(f"{run}: {len(e.data):,} {ds} test images")
        std = layer_responses(e.model, e.data.images, e.mean, e.std, e.image_size)
        label = _label(Path(run), e.model)
        result["runs"][str(run)] = {"model": label, "layers": std,
                                    "by_layer": list(std.values()),
                                    "sorted": sorted(std.values(), reverse=True)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "responses.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    plot_responses(result, out / "responses.png")
    return result


def _run_dataset(run: Path) -> str:
    """The dataset a run folder was trained on (its config.json), else Fashion-MNIST."""
    from ..untrusted import parse_json
    cfg = run / "config.json" if run.is_dir() else run.parent / "config.json"
    if cfg.is_file():
        info = parse_json(cfg.read_bytes(), str(cfg), "content")
        ds = info.get("train", {}).get("dataset") if isinstance(info, dict) else None
        if isinstance(ds, str):
            return ds
    return "fashion-mnist"


def _label(run: Path, model: nn.Module) -> str:
    """plain-20 / ResNet-56 as the paper writes them, from the architecture."""
    c = model.cfg
    return f"{'plain' if c.shortcut == 'none' else 'ResNet'}-{c.depth}"


def plot_responses(result: dict[str, Any], path: Path) -> Path | None:
    """Figure 7's two panels; plain nets dashed, ResNets solid. None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6.5))
    for r in result["runs"].values():
        style = "--" if r["model"].startswith("plain") else "-"
        for ax, key in ((a, "by_layer"), (b, "sorted")):
            ys = r[key]
            ax.plot(range(1, len(ys) + 1), ys, style, lw=1.4, label=r["model"])
    a.set(ylabel="std", title="3x3 layer responses: original order")
    b.set(xlabel="layer index", ylabel="std", title="sorted by magnitude")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
