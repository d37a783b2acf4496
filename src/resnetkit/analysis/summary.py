"""Per-layer summary, totals, memory, FLOP breakdown, side-by-side comparison, block costs."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..blocks import BLOCK_TYPES
from ..config import MAX_WIDTH, ResNetConfig
from ..errors import UserError
from ..geometry import MAX_IMAGE_SIZE, receptive_fields
from ..model import ResNet
from ..options import parse_model_spec
from ..runtime import check_memory
from .trace import KINDS, LayerRecord, build_model, totals, trace

MB = 1e6  # memory is reported in MB = 10^6 bytes, as torchinfo does

CONVENTIONS = {
    "macs": "conv and fc weight multiply-accumulates, no bias/BN/ReLU/pool/add "
            "(torchvision's 'GFLOPS'); FLOPs = 2 x MACs",
    "params": "trainable and frozen parameters; BN running mean/var are buffers, not parameters",
    "activations": "bytes of the tensors autograd saves for backward in one training forward "
                   "pass, measured and scaled by batch",
    "torchinfo_pass": "torchinfo's 'forward/backward pass size': 2 x output bytes of the "
                      "layers that have parameters",
    "training_total": "input + parameters + gradients + SGD momentum (1 buffer per parameter) "
                      "+ saved activations",
    "inference_total": "input + parameters + the largest input+output pair of any one layer",
}


def saved_activation_bytes(model: nn.Module, image_size: tuple[int, int], in_chans: int) -> int:
    """Bytes autograd keeps for backward in one training forward of batch 1 on the CPU."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    x = torch.zeros(1, in_chans, *image_size, requires_grad=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(x)
    return sum(seen.values())


def _group(model: nn.Module, records: list[LayerRecord], depth: int | None) -> list[dict[str, Any]]:
    """Rows of the table, layers grouped by `depth` name components; a row's receptive field
    is the one after its last layer on the main path (None off it: shortcuts, BN, the head)."""
    fields = {name: (r, j) for name, r, j in receptive_fields(model)} \
        if isinstance(model, ResNet) else {}
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        parts = r.name.split(".")
        key = ".".join(parts[:depth]) if depth else r.name
        row = rows.get(key)
        if row is None:
            kind = r.type if key == r.name else type(model.get_submodule(key)).__name__
            row = rows[key] = {"name": key, "type": kind, "input": list(r.in_shape),
                               "output": list(r.out_shape), "params": 0, "macs": 0,
                               "receptive_field": None, "effective_stride": None}
        if r.name in fields:
            row["receptive_field"], row["effective_stride"] = fields[r.name]
        row["output"] = list(r.out_shape)
        row["params"] += r.params
        row["macs"] += r.macs
    return list(rows.values())


def summary(model: str | ResNet, image_size: int | tuple[int, int] = 224, batch: int = 1,
            depth: int | None = 3, memory: bool = True, **overrides: Any) -> dict[str, Any]:
    """Per-layer table and totals: parameters (trainable, frozen), buffers, MACs, FLOPs and
    memory, with the conventions stated. depth groups layers by name components (1: conv1,
    layer1...; 2: layer1.0...; None: every layer)."""
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    real = isinstance(model, nn.Module)
    m = model if real else build_model(model, **overrides)
    records = trace(m, hw, batch)
    params = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    running = sum(b.numel() for n, b in m.named_buffers()
                  if n.endswith(("running_mean", "running_var")))
    buffers = sum(b.numel() for b in m.buffers())
    t = totals(records)
    macs = t["conv"] + t["fc"]
    cfg: ResNetConfig = m.cfg
    in_bytes = batch * cfg.in_chans * hw[0] * hw[1] * 4
    p_bytes = params * 4
    with_params = sum(_numel(r.out_shape) for r in records if r.params)
    mem: dict[str, float] = {"input_mb": in_bytes / MB, "params_mb": p_bytes / MB,
                             "torchinfo_pass_mb": 2 * with_params * 4 / MB}
    mem["torchinfo_total_mb"] = mem["input_mb"] + mem["params_mb"] + mem["torchinfo_pass_mb"]
    if memory:  # one real training forward at batch 1: checked against free memory first
        check_memory(cfg, hw, 1, training=True,
                     what=f"measuring the training memory of this {cfg.block} ResNet")
        saved = saved_activation_bytes(build_model(model, meta=False, **overrides), hw, cfg.in_chans)
        mem["saved_activations_mb"] = saved * batch / MB
        mem["training_total_mb"] = (in_bytes + 3 * trainable * 4 + (params - trainable) * 4
                                    + saved * batch) / MB
    peak_pair = max(_numel(r.in_shape) + _numel(r.out_shape) for r in records) * 4
    mem["inference_total_mb"] = (in_bytes + p_bytes + peak_pair) / MB
    return {
        "model": model if isinstance(model, str) else type(model).__name__,
        "image_size": list(hw), "batch": batch,
        "layers": _group(m, records, depth),
        "totals": {"params": params, "trainable": trainable, "non_trainable": params - trainable,
                   "buffers": buffers, "bn_running_stats": running,
                   "macs": macs, "flops": 2 * macs},
        "memory": mem,
        "reconcile": (f"{params:,} parameters (torchvision, timm) + {running:,} BN running "
                      f"mean/var = {params + running:,} (Paddle's 'Total params', which counts "
                      f"running statistics as non-trainable parameters)"),
        "conventions": CONVENTIONS,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _stage_of(name: str) -> str:
    top = name.split(".")[0]
    if top.startswith("layer"):
        return top
    return "head" if top in ("avgpool", "fc") else "stem"


def flops(model: str | ResNet, image_size: int | tuple[int, int] = 224, batch: int = 1,
          **overrides: Any) -> dict[str, Any]:
    """Every op kind counted in one forward pass, in total and per stage.

    Returns MACs for conv and fc, elements for BN, ReLU, pooling (input elements), residual
    adds and the fc bias; `macs` is torchvision's headline (conv + fc), `flops` = 2 x macs, and
    `flops_all_ops` adds one op per BN/ReLU/add/bias element and per pooled input element
    (BN counted as 2: scale and shift).
    """
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    records = trace(build_model(model, **overrides), hw, batch)
    by_kind = totals(records)
    stages: dict[str, dict[str, int]] = {}
    for r in records:
        if r.kind:
            st = stages.setdefault(_stage_of(r.name), {k: 0 for k in KINDS})
            st[r.kind] += r.macs if r.kind in ("conv", "fc") else r.elements
    macs = by_kind["conv"] + by_kind["fc"]
    extra = 2 * by_kind["bn"] + by_kind["relu"] + by_kind["maxpool"] + by_kind["avgpool"] \
        + by_kind["add"] + by_kind["fc_bias"]
    return {"model": model if isinstance(model, str) else type(model).__name__,
            "image_size": list(hw), "batch": batch, "by_kind": by_kind,
            "per_stage": stages, "macs": macs, "flops": 2 * macs,
            "flops_all_ops": 2 * macs + extra, "convention": CONVENTIONS["macs"]}


def parse_block_spec(spec: str) -> tuple[str, int, int, int]:
    """"KIND:IN[->OUT][/STRIDE]", e.g. "basic:64", "bottleneck:256", "basic:64->128/2"."""
    try:
        kind, rest = spec.split(":")
        stride = 1
        if "/" in rest:
            rest, s = rest.split("/")
            stride = int(s)
        cin, cout = (int(v) for v in rest.split("->")) if "->" in rest else (int(rest),) * 2
    except ValueError:
        raise UserError(f"block spec {spec!r} must look like KIND:IN[->OUT][/STRIDE], "
                        f"e.g. basic:64 or bottleneck:64->256/2") from None
    if kind not in ("basic", "bottleneck") or min(cin, cout, stride) < 1:
        raise UserError(f"block spec {spec!r}: kind must be basic or bottleneck, channels and "
                        f"stride positive")
    if max(cin, cout) > MAX_WIDTH or stride > 64:
        raise UserError(f"block spec {spec!r}: at most {MAX_WIDTH:,} channels and stride 64")
    if kind == "bottleneck" and cout % 4:
        raise UserError(f"block spec {spec!r}: a bottleneck's output must be 4 x its width")
    return kind, cin, cout, stride


def block_cost(spec: str, image_size: int = 56) -> dict[str, Any]:
    """Parameters and MACs of one residual block at image_size x image_size, by layer.

    A bottleneck's inner width is OUT / 4 (torchvision's expansion); the shortcut is a
    projection (option B) where channels or size change."""
    kind, cin, cout, stride = parse_block_spec(spec)
    if not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise UserError(f"--image-size must be from 1 to {MAX_IMAGE_SIZE}, got {image_size}")
    cfg = ResNetConfig(block=kind)
    planes = cout // cfg.block_expansion
    with torch.device("meta"):  # shapes and counts only: no memory, no math
        block = BLOCK_TYPES[kind](cfg, cin, planes, stride)
    records = trace(block, (image_size, image_size), in_chans=cin)
    convs = [{"layer": r.name, "weights": r.params, "macs": r.macs,
              "in": list(r.in_shape[1:]), "out": list(r.out_shape[1:])}
             for r in records if r.kind == "conv"]
    main = [c for c in convs if not c["layer"].startswith("downsample")]
    return {"spec": spec, "image_size": image_size, "convs": convs,
            "params": sum(p.numel() for p in block.parameters()),
            "conv_weights": sum(c["weights"] for c in convs),
            "main_path_macs": sum(c["macs"] for c in main),
            "macs": sum(c["macs"] for c in convs)}


def compare(models: list[str | tuple[str, dict[str, Any]]], image_size: int = 224,
            memory: bool = True, common: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Side by side: depth, params, MACs, FLOPs, memory at batch 1 and feature-map sizes.
    models: (name, overrides) pairs or "NAME[:key=value,key=value]" specs; `common`
    overrides apply to every model (a model's own win)."""
    rows = []
    for spec in models:
        name, own = parse_model_spec(spec) if isinstance(spec, str) else spec
        overrides = {**(common or {}), **own}
        s = summary(name, image_size, depth=1, memory=memory, **overrides)
        m = build_model(name, **overrides)
        feats = []
        with torch.no_grad():
            x = torch.empty(1, m.cfg.in_chans, image_size, image_size, device="meta")
            for f in m.forward_intermediates(x, intermediates_only=True):
                feats.append(f.shape[-1])
        label = name + "".join(f" {k}={v}" for k, v in overrides.items())
        rows.append({"model": label, "depth": m.cfg.depth, "params": s["totals"]["params"],
                     "macs": s["totals"]["macs"], "flops": s["totals"]["flops"],
                     "training_mb": s["memory"].get("training_total_mb"),
                     "feature_maps": feats})
    return rows
