"""A picture of the network in the paper's figure convention: one box per block (folded
runs of identical blocks), solid lines for identity shortcuts, dashed for projections.
Drawn from the walk-through, written as SVG, or PNG through Pillow."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError

W, BOX_W, ROW, GAP = 560, 330, 22, 26
X0 = 70
STAGE_FILL = ["#dbe9f6", "#e3f1dc", "#fbe8d2", "#efe0f3", "#f6f3d0", "#dcf3f1"]


def _conv_label(o: dict[str, Any]) -> str:
    g = f", /{o['groups']} groups" if o.get("groups", 1) > 1 else ""
    s = f", /{o['stride']}" if o["stride"] > 1 else ""
    return f"{o['kernel'][0]}x{o['kernel'][1]} conv, {o['out_ch']}{g}{s}"


def layout(walk: dict[str, Any]) -> list[tuple]:
    """Drawing primitives: ("rect", x, y, w, h, fill), ("text", x, y, s, size, anchor),
    ("line", x1, y1, x2, y2, dashed), ("arc", x, y1, y2, dashed, label)."""
    prims: list[tuple] = []
    y = 20
    h, w = walk["image_size"]
    prims.append(("text", X0 + BOX_W / 2, y + 10, f"{walk['model']}  ({walk['depth']['total']} "
                  f"weighted layers)", 15, "middle"))
    y += 34
    prims.append(("text", X0 + BOX_W / 2, y, f"input {walk['in_chans']} x {h}x{w}", 12, "middle"))
    y += 10
    rows = [_conv_label(o) if o["op"] == "conv" else
            f"{o['kernel'][0]}x{o['kernel'][1]} max-pool, /{o['stride']}" for o in walk["stem"]]
    out_hw = walk["stem"][-1]["out_hw"]
    stem_ch = [o["out_ch"] for o in walk["stem"] if o["op"] == "conv"][-1]
    y = _box(prims, y, rows, "#eeeeee", f"stem   {stem_ch} @ {out_hw[0]}x{out_hw[1]}")
    for si, st in enumerate(walk["stages"]):
        blocks, i = st["blocks"], 0
        while i < len(blocks):
            b, j = blocks[i], i + 1
            while i > 0 and j < len(blocks) and blocks[j]["ops"] == [
                    {**o, "layer": blocks[j]["ops"][k]["layer"]} for k, o in enumerate(b["ops"])]:
                j += 1
            top = y
            title = f"{st['name']} block {b['index']}" + (f"-{blocks[j - 1]['index']}  (x{j - i})"
                                                          if j - i > 1 else "")
            label = f"{title}   {b['out'][0]} @ {b['out'][1]}x{b['out'][2]}"
            y = _box(prims, y, [_conv_label(o) for o in b["ops"]],
                     STAGE_FILL[si % len(STAGE_FILL)], label)
            sc = b["shortcut"]
            if sc["kind"] == "none":  # a plain network: no arc around the block
                i = j
                continue
            dashed = sc["kind"] == "projection"
            text = {"identity": "identity", "zero-pad": f"zero-pad, /{sc.get('stride', 1)}",
                    "projection": f"1x1 conv, {sc.get('out_ch')}"
                    + (f", /{sc['stride']}" if sc.get("stride", 1) > 1 else "")}[sc["kind"]]
            prims.append(("arc", X0 + BOX_W, top + GAP / 2, y + GAP / 2, dashed, text))
            i = j
    hd = walk["head"]
    rows = [f"avg pool {hd['avgpool']['in_hw'][0]}x{hd['avgpool']['in_hw'][1]} -> 1x1"]
    if hd["fc"]:
        rows.append(f"fc {hd['fc']['in']} -> {hd['fc']['out']}, softmax")
    y = _box(prims, y, rows, "#eeeeee", "head")
    legend = ("no shortcuts (a plain network)" if walk["stages"][0]["blocks"][0]["shortcut"]
              ["kind"] == "none" else "solid: identity shortcut   dashed: projection shortcut")
    prims.append(("text", X0, y + 22, legend, 11, "start"))
    prims.append(("size", W, y + 40))
    return prims


def _box(prims: list[tuple], y: float, rows: list[str], fill: str, title: str) -> float:
    prims.append(("line", X0 + BOX_W / 2, y, X0 + BOX_W / 2, y + GAP, False))
    y += GAP
    h = ROW * (len(rows) + 1) + 6
    prims.append(("rect", X0, y, BOX_W, h, fill))
    prims.append(("text", X0 + 8, y + 16, title, 12, "start"))
    for k, r in enumerate(rows):
        prims.append(("text", X0 + BOX_W / 2, y + 16 + ROW * (k + 1), r, 12, "middle"))
    return y + h


def to_svg(prims: list[tuple]) -> str:
    size = next(p for p in prims if p[0] == "size")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size[1]}" height="{size[2]:.0f}" '
           f'font-family="DejaVu Sans, Arial, sans-serif">',
           '<rect width="100%" height="100%" fill="white"/>']
    esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # noqa
    for p in prims:
        if p[0] == "rect":
            out.append(f'<rect x="{p[1]}" y="{p[2]:.0f}" width="{p[3]}" height="{p[4]:.0f}" '
                       f'rx="6" fill="{p[5]}" stroke="#333"/>')
        elif p[0] == "text":
            out.append(f'<text x="{p[1]:.0f}" y="{p[2]:.0f}" font-size="{p[4]}" '
                       f'text-anchor="{p[5]}">{esc(p[3])}</text>')
        elif p[0] == "line":
            out.append(f'<line x1="{p[1]:.0f}" y1="{p[2]:.0f}" x2="{p[3]:.0f}" y2="{p[4]:.0f}" '
                       f'stroke="#333" stroke-width="1.5"/>')
        elif p[0] == "arc":
            x, y1, y2, dashed, label = p[1:]
            dash = ' stroke-dasharray="6,4"' if dashed else ""
            c = X0 + BOX_W / 2
            out.append(f'<path d="M{c:.0f},{y1:.0f} L{x:.0f},{y1:.0f} C{x + 40:.0f},{y1:.0f} '
                       f'{x + 40:.0f},{y2:.0f} {x:.0f},{y2:.0f} L{c + 7:.0f},{y2:.0f}" '
                       f'fill="none" stroke="#333" stroke-width="1.5"{dash}/>')
            out.append(f'<circle cx="{c:.0f}" cy="{y2:.0f}" r="7" fill="white" stroke="#333"/>'
                       f'<text x="{c:.0f}" y="{y2 + 4:.0f}" font-size="12" '
                       f'text-anchor="middle">+</text>')
            out.append(f'<text x="{x + 36:.0f}" y="{(y1 + y2) / 2 + 4:.0f}" font-size="11">'
                       f'{esc(label)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def to_png(prims: list[tuple], path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont
    size = next(p for p in prims if p[0] == "size")
    scale = 2
    img = Image.new("RGB", (size[1] * scale, int(size[2] * scale)), "white")
    d = ImageDraw.Draw(img)
    fonts: dict[int, Any] = {}

    def font(n: int):
        if n not in fonts:
            try:
                fonts[n] = ImageFont.truetype("DejaVuSans.ttf", n * scale)
            except OSError:
                fonts[n] = ImageFont.load_default(size=n * scale)
        return fonts[n]

    for p in prims:
        if p[0] == "rect":
            d.rounded_rectangle([p[1] * scale, p[2] * scale, (p[1] + p[3]) * scale,
                                 (p[2] + p[4]) * scale], 6 * scale, fill=p[5], outline="#333",
                                width=scale)
        elif p[0] == "text":
            anchor = {"middle": "ms", "start": "ls"}[p[5]]
            d.text((p[1] * scale, p[2] * scale), p[3], fill="black", font=font(p[4]),
                   anchor=anchor)
        elif p[0] == "line":
            d.line([p[1] * scale, p[2] * scale, p[3] * scale, p[4] * scale], fill="#333",
                   width=scale * 2)
        elif p[0] == "arc":
            x, y1, y2, dashed, label = p[1:]
            c = X0 + BOX_W / 2
            pts = [(c, y1)] + _bezier((x, y1), (x + 40, y1), (x + 40, y2), (x, y2)) + [(c + 7, y2)]
            pts = _densify(pts, 5)
            pts = [(a * scale, b * scale) for a, b in pts]
            step = 2 if dashed else 1
            for k in range(0, len(pts) - 1, step):
                d.line([pts[k], pts[k + 1]], fill="#333", width=scale * 2)
            d.text(((x + 36) * scale, ((y1 + y2) / 2 + 4) * scale), label, fill="black",
                   font=font(11), anchor="ls")
            r = 7 * scale
            d.ellipse([c * scale - r, y2 * scale - r, c * scale + r, y2 * scale + r],
                      fill="white", outline="#333", width=scale)
            d.text((c * scale, y2 * scale), "+", fill="black", font=font(12), anchor="mm")
    img.save(path)


def _densify(pts: list[tuple[float, float]], step: float) -> list[tuple[float, float]]:
    """Points at most `step` apart along the polyline, so dashes come out even."""
    out = [pts[0]]
    for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
        n = max(1, int(((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5 / step))
        out += [(x1 + (x2 - x1) * k / n, y1 + (y2 - y1) * k / n) for k in range(1, n + 1)]
    return out


def _bezier(p0, p1, p2, p3, n: int = 40) -> list[tuple[float, float]]:
    pts = []
    for i in range(n + 1):
        t = i / n
        a, b, c, e = (1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t ** 3
        pts.append((a * p0[0] + b * p1[0] + c * p2[0] + e * p3[0],
                    a * p0[1] + b * p1[1] + c * p2[1] + e * p3[1]))
    return pts


def diagram(walk: dict[str, Any], path: str | Path) -> Path:
    """Write the diagram of a walk-through (from describe) to path: .svg, or .png via Pillow."""
    path = Path(path)
    prims = layout(walk)
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise UserError(f"diagram output {path} must end in .svg or .png")
    try:
        if suffix == ".svg":
            path.write_text(to_svg(prims))
        else:
            to_png(prims, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    return path
