"""The stage-by-stage walk-through of a ResNet: every conv and pool with kernel, stride,
padding, channels and feature-map size, every shortcut, and the depth accounting."""
from __future__ import annotations

from typing import Any

from torch import nn

from ..geometry import receptive_fields
from ..model import ResNet
from .trace import LayerRecord, build_model, trace


def _op(r: LayerRecord) -> dict[str, Any]:
    m = r.module
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    op = {"layer": r.name, "op": r.kind if r.kind != "avgpool" else "avgpool",
          "kernel": pair(m.kernel_size), "stride": pair(m.stride)[0],
          "padding": pair(m.padding)[0],
          "in_hw": list(r.in_shape[2:]), "out_hw": list(r.out_shape[2:]),
          "formula_hw": list(r.formula_hw) if r.formula_hw else None}
    if isinstance(m, nn.Conv2d):
        op.update(in_ch=m.in_channels, out_ch=m.out_channels, groups=m.groups,
                  dilation=m.dilation[0])
    return op


def _shortcut(block_name: str, block: nn.Module, recs: list[LayerRecord]) -> dict[str, Any]:
    ds = block.downsample
    if ds is None:
        return {"kind": "none"}
    if isinstance(ds, nn.Identity):
        return {"kind": "identity"}
    if not isinstance(ds, nn.Sequential):
        return {"kind": "zero-pad", "in_ch": ds.in_chs, "out_ch": ds.out_chs, "stride": ds.stride}
    conv = next(r for r in recs if r.name.startswith(f"{block_name}.downsample")
                and r.kind == "conv")
    pooled = any(isinstance(m, nn.AvgPool2d) for m in ds)
    stride = ds[0].stride if pooled else conv.module.stride[0]
    return {"kind": "projection", "layer": conv.name, "in_ch": conv.module.in_channels,
            "out_ch": conv.module.out_channels, "stride": stride, "avg_pool": pooled,
            "in_hw": list(conv.in_shape[2:]) if not pooled else None,
            "out_hw": list(conv.out_shape[2:])}


def describe(model: str | ResNet, image_size: int | tuple[int, int] = 224,
             **overrides: Any) -> dict[str, Any]:
    """The walk-through as data (JSON Schema: analysis/schemas/describe.json).

    Args:
        model: a preset name or a ResNet; overrides apply to a preset name.
        image_size: input side, or (height, width).
    Raises:
        UserError: unknown model or bad override; an input so small a layer's output is empty.
    """
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    name = model if isinstance(model, str) else type(model).__name__
    m = build_model(model, **overrides)
    recs = trace(m, hw)
    cfg = m.cfg
    main = [r for r in recs if r.kind in ("conv", "maxpool")]
    stem = [_op(r) for r in main if not r.name.startswith("layer")]
    fields = receptive_fields(m)
    stem_rf = [v for v in fields if not v[0].startswith("layer")][-1]
    stages = []
    for i, stage in enumerate(m.stage_names):
        blocks = []
        for j, block in enumerate(getattr(m, stage)):
            bname = f"{stage}.{j}"
            brecs = [r for r in recs if r.name.startswith(bname + ".")]
            ops = [_op(r) for r in brecs if r.kind == "conv" and ".downsample" not in r.name
                   and ".se." not in r.name]
            blocks.append({"index": j + 1, "in": [ops[0]["in_ch"], *ops[0]["in_hw"]],
                           "out": [ops[-1]["out_ch"], *ops[-1]["out_hw"]], "ops": ops,
                           "shortcut": _shortcut(bname, block, brecs)})
        last = [v for v in fields if v[0].startswith(stage + ".")][-1]
        stages.append({"name": f"conv{i + 2}_x", "module": stage, "blocks": blocks,
                       "receptive_field": last[1], "effective_stride": last[2]})
    pool = next(r for r in recs if r.kind == "avgpool" and r.name == "avgpool")
    fc = [r for r in recs if r.kind == "fc"]
    head = {"avgpool": {"in_hw": list(pool.in_shape[2:]), "out_hw": [1, 1]},
            "fc": {"in": fc[0].module.in_features, "out": fc[0].module.out_features}
            if fc else None}
    stem_convs = sum(1 for o in stem if o["op"] == "conv")
    per_block = len(stages[0]["blocks"][0]["ops"])
    n_blocks = sum(cfg.layers)
    projections = sum(1 for s in stages for b in s["blocks"] if b["shortcut"]["kind"] == "projection")
    depth = stem_convs + per_block * n_blocks + len(fc)
    text = (f"{depth} = {stem_convs} stem conv{'s' if stem_convs > 1 else ''} + {per_block} convs "
            f"x {n_blocks} blocks + {len(fc)} fc")
    if cfg.shortcut == "none":
        text += "; no shortcuts (a plain network)"
    else:
        text += (f"; the {projections} projection convs are not counted (they sit on the "
                 f"shortcuts)" if projections else "; the shortcuts have no convs")
    return {"model": name, "image_size": list(hw), "in_chans": cfg.in_chans,
            "block": cfg.block, "stride_in_1x1": cfg.stride_in_1x1, "stem": stem,
            "stages": stages, "head": head,
            "receptive_field": {"stem": stem_rf[1], "stem_effective_stride": stem_rf[2],
                                "convention": "theoretical, along the convs of every block "
                                              "(Araujo et al., Distill 2019); it may exceed "
                                              "the input"},
            "depth": {"total": depth, "stem_convs": stem_convs, "convs_per_block": per_block,
                      "blocks": n_blocks, "fc": len(fc), "projection_convs": projections,
                      "text": text}}


def _hw(v: list[int]) -> str:
    return f"{v[0]}x{v[1]}"


def _op_line(o: dict[str, Any], label: str) -> str:
    k = f"{o['kernel'][0]}x{o['kernel'][1]}"
    if o["op"] == "conv":
        extra = (f" g{o['groups']}" if o["groups"] > 1 else "") + \
                (f" d{o['dilation']}" if o["dilation"] > 1 else "")
        what = f"conv {k} {o['in_ch']}->{o['out_ch']}{extra}"
    else:
        what = f"max-pool {k}"
    return (f"{label:<10}{what:<28}s{o['stride']} p{o['padding']:<4}"
            f"{_hw(o['in_hw'])} -> {_hw(o['out_hw'])}")


def _shortcut_line(sc: dict[str, Any], block: dict[str, Any]) -> str:
    if sc["kind"] == "none":
        return "shortcut  none (plain network: the block outputs ReLU(F(x)))"
    if sc["kind"] == "identity":
        return "shortcut  identity"
    if sc["kind"] == "zero-pad":
        return (f"shortcut  identity, subsampled by {sc['stride']}, zero-padded "
                f"{sc['in_ch']}->{sc['out_ch']} channels (option A, no parameters)")
    why = ("changes depth only" if sc["stride"] == 1 else "changes depth and size") \
        if sc["in_ch"] != sc["out_ch"] else ("changes size only" if sc["stride"] > 1 else
                                             "option C: projection everywhere")
    pool = f"avg-pool {sc['stride']}x{sc['stride']} then " if sc["avg_pool"] and sc["stride"] > 1 else ""
    return (f"shortcut  projection: {pool}1x1 conv {sc['in_ch']}->{sc['out_ch']}, stride "
            f"{1 if sc['avg_pool'] else sc['stride']} ({why})")


def _signature(block: dict[str, Any]) -> tuple:
    strip = lambda d: tuple((k, str(v)) for k, v in d.items() if k != "layer")  # noqa: E731
    return tuple(strip(o) for o in block["ops"]) + (strip(block["shortcut"]),)


def render_describe(walk: dict[str, Any], expand: bool = False) -> str:
    """The walk-through as text. Identical consecutive blocks are folded unless expand."""
    h, w = walk["image_size"]
    variant = ""
    if walk["block"].endswith("bottleneck"):
        variant = ", v1 (stride on the first 1x1)" if walk["stride_in_1x1"] else \
            ", v1.5 (stride on the 3x3)"
    lines = [f"{walk['model']} at {h}x{w}: {walk['block']} blocks{variant}",
             f"input     {walk['in_chans']} x {h}x{w}", "stem"]
    lines += ["  " + _op_line(o, o["layer"]) for o in walk["stem"]]
    for st in walk["stages"]:
        b0, last = st["blocks"][0], st["blocks"][-1]
        lines.append(f"{st['name']} ({st['module']}): {len(st['blocks'])} blocks, "
                     f"{b0['in'][0]}x{_hw(b0['in'][1:])} -> {last['out'][0]}x{_hw(last['out'][1:])}"
                     f", receptive field {st['receptive_field']}, effective stride "
                     f"{st['effective_stride']}")
        blocks, i = st["blocks"], 0
        while i < len(blocks):
            b = blocks[i]
            j = i + 1
            if not expand and i > 0:
                while j < len(blocks) and _signature(blocks[j]) == _signature(b):
                    j += 1
            lines.append(f"  block {b['index']}")
            lines += ["    " + _op_line(o, o["layer"].rsplit(".", 1)[-1]) for o in b["ops"]]
            lines.append("    " + _shortcut_line(b["shortcut"], b))
            if j - i > 1:
                rest = (f"block {blocks[i + 1]['index']}" if j - i == 2 else
                        f"blocks {blocks[i + 1]['index']}-{blocks[j - 1]['index']}")
                lines.append(f"  {rest}: same as block {b['index']}")
            i = j
    hd = walk["head"]
    lines.append(f"head      average pool {_hw(hd['avgpool']['in_hw'])} -> 1x1")
    if hd["fc"]:
        lines.append(f"          fc {hd['fc']['in']}->{hd['fc']['out']}, softmax")
    lines.append(f"depth     {walk['depth']['text']}")
    return "\n".join(lines)
