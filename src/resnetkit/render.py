"""How the `resnetkit` command shows each verb's result on a terminal: rich tables and plain
lines. Every function takes the library's result (the data `--json` prints) and prints it.

Results hold text from outside (class names from folder names and other people's files,
file names, tags, metadata): every string goes through `untrusted.shown` on its way to the
terminal, and none is read as rich markup or emoji codes, so none can move the cursor,
recolour the screen, add table rows or restyle the output."""
from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from .untrusted import shown


class _PlainConsole(Console):
    """A rich console that shows every string as it is: no markup, no emoji codes, no
    highlighting, control characters escaped (styles come only from Text objects)."""

    def __init__(self, **kwargs: Any):
        super().__init__(markup=False, emoji=False, highlight=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(shown(text), **kwargs)


def console() -> Console:
    """A console 100 columns wide when not on a terminal (logs, pipes)."""
    return _PlainConsole(width=100) if not sys.stdout.isatty() else _PlainConsole()


def say(*lines: Any) -> None:
    """print() for lines that may hold text from outside: each argument is one line,
    escaped as tables are (a line break inside one is shown as \x0a)."""
    for line in lines:
        print(shown(line))


def _bold(text: str) -> Text:
    return Text(shown(text), style="bold")


def _n(n: int) -> str:
    return f"{n:,}"


def models(rows: dict[str, Any]) -> None:
    t = Table("model", "block", "layers", "depth", "groups x width", "stem", "shortcut")
    for name, c in rows.items():
        t.add_row(name, c.block, str(list(c.layers)), str(c.depth),
                  f"{c.groups}x{c.width_per_group}", c.stem, c.shortcut)
    console().print(t)


def summary(s: dict[str, Any]) -> None:
    t = Table("layer", "type", "input", "output", "params", "MACs", "RF / stride",
              title=f"{s['model']} summary")
    for r in s["layers"]:
        rf = f"{r['receptive_field']} / {r['effective_stride']}" if r.get("receptive_field") \
            else ""
        t.add_row(r["name"], r["type"], "x".join(map(str, r["input"][1:])),
                  "x".join(map(str, r["output"][1:])), _n(r["params"]), _n(r["macs"]), rf)
    c = console()
    c.print(t)
    tot, mem = s["totals"], s["memory"]
    c.print(f"input {s['image_size'][0]}x{s['image_size'][1]}, batch {s['batch']}")
    c.print(f"parameters {tot['params']:,} (trainable {tot['trainable']:,}, non-trainable "
            f"{tot['non_trainable']:,}); buffers {tot['buffers']:,} (BN running mean/var "
            f"{tot['bn_running_stats']:,})")
    c.print(f"reconcile: {s['reconcile']}")
    c.print(f"MACs {tot['macs']:,} ({tot['macs'] / 1e9:.2f} G); FLOPs {tot['flops']:,}")
    c.print("memory (MB = 10^6 bytes): " + ", ".join(f"{k.removesuffix('_mb')} {v:.2f}"
                                                    for k, v in mem.items()))
    c.print("conventions: " + "; ".join(f"{k}: {v}" for k, v in s["conventions"].items()))


def block_costs(rows: list[dict[str, Any]], image_size: int) -> None:
    t = Table("block", "conv", "in", "out", "weights", "MACs",
              title=f"block costs at {image_size}x{image_size}")
    for r in rows:
        for cv in r["convs"]:
            t.add_row(r["spec"], cv["layer"], "x".join(map(str, cv["in"])),
                      "x".join(map(str, cv["out"])), _n(cv["weights"]), _n(cv["macs"]))
        t.add_row(r["spec"], _bold("total"), "", "", _n(r["conv_weights"]), _bold(f"{r['macs']:,}"),
                  end_section=True)
    console().print(t)
    if len(rows) == 2:
        d = rows[0]["macs"] - rows[1]["macs"]
        say(f"difference: {rows[0]['spec']} - {rows[1]['spec']} = {d:,} MACs")


def flops(f: dict[str, Any]) -> None:
    kinds = list(f["by_kind"])
    size = f["image_size"]
    t = Table("part", *kinds, title=f"{f['model']} at {size[0]}x{size[1]}: MACs (conv, fc) "
              "and elements (others)")
    for st, v in f["per_stage"].items():
        t.add_row(st, *(_n(v[k]) for k in kinds))
    t.add_row(_bold("total"), *(_bold(f"{f['by_kind'][k]:,}") for k in kinds))
    c = console()
    c.print(t)
    c.print(f"MACs {f['macs']:,} ({f['macs'] / 1e9:.3f} G)  FLOPs {f['flops']:,}  "
            f"FLOPs incl. BN/ReLU/pool/add/bias {f['flops_all_ops']:,}")
    c.print(f"convention: {f['convention']}")


def compare(rows: list[dict[str, Any]], image_size: int) -> None:
    t = Table("model", "depth", "params", "MACs (G)", "FLOPs (G)", "train MB (b=1)",
              "feature maps", title=f"at {image_size}x{image_size}")
    for r in rows:
        t.add_row(r["model"], str(r["depth"]), _n(r["params"]), f"{r['macs'] / 1e9:.2f}",
                  f"{r['flops'] / 1e9:.2f}",
                  f"{r['training_mb']:.0f}" if r["training_mb"] is not None else "-",
                  "/".join(map(str, r["feature_maps"])))
    console().print(t)


def train_start(info: dict[str, Any]) -> str:
    """The line that opens a training run, from Trainer.describe(): folder, precision,
    layout, device, a compiled step, and with several processes or accumulation steps the batches and lr."""
    i = info
    return (f"run folder: {i['run_dir']} ({i['precision']}, channels_last="
            f"{i['channels_last']}, {i['device']}" +
            (", compiled step" if i.get("compile") else "") +
            (f", {i['world']} processes ({i['backend']}), {i['per_rank']} per rank x "
             f"{i['accum']} accumulation = global batch {i['global_batch']}, lr {i['lr']:g}"
             if i["world"] > 1 or i["accum"] > 1 else "") + ")")


def train_result(r: dict[str, Any]) -> str:
    """The lines that close a training run, from fit()'s result: test accuracy (with and
    without test-time flips), best, time, memory, folder."""
    lines = []
    if "test_top1_without_tta" in r:
        what = "flips and shifts" if r.get("tta_shift") and r.get("tta_flip") else \
            "shifts" if r.get("tta_shift") else "flips"
        lines.append(f"test top-1 without test-time {what} {100 * r['test_top1_without_tta']:.2f}%")
    lines.append(f"test top-1 {100 * r['test']['top1']:.2f}%  top-5 {100 * r['test']['top5']:.2f}%  "
                 f"best {100 * r['best_top1']:.2f}%  train time {r['wall_s']:.0f} s  "
                 f"peak memory {r['peak_mem_mb']:.0f} MB  -> {r['run_dir']}")
    return "\n".join(lines)


def evaluation(r: dict[str, Any], title: str) -> None:
    t = Table("class", "accuracy", title=f"{title}: top-1 {100 * r['top1']:.2f}%, top-5 "
              f"{100 * r['top5']:.2f}%, loss {r['loss']:.4f}")
    for name, acc in r["per_class"].items():
        t.add_row(name, f"{100 * acc:.2f}%")
    c = console()
    c.print(t)
    c.print("confusion matrix (rows: true, columns: predicted)")
    for name, row in zip(r["per_class"], r["confusion"]):
        c.print(f"{name[:12]:>12} " + " ".join(f"{v:5d}" for v in row))
    if r.get("classes_left_out"):
        c.print(f"not scored (classes the model does not know): "
                f"{', '.join(r['classes_left_out'])}")


def predictions(res: list[dict[str, Any]]) -> None:
    t = Table("file", "class", "probability")
    for r in res:
        for k, p in enumerate(r["top"]):
            t.add_row(r["file"] if k == 0 else "", p["class"], f"{p['prob']:.4f}",
                      end_section=k == len(r["top"]) - 1)
    console().print(t)


def bench(r: dict[str, Any]) -> None:
    t = Table("path", "precision", "img/s", "ms/batch", "min-max ms", "speed-up (paired)",
              "of peak",
              title=f"{r['model']}, batch {r['batch']}, {r['image_size']}x{r['image_size']}, "
                    f"{r['hardware']['threads']} threads")
    for k, v in r["results"].items():
        frac = f"{100 * v['fraction_of_peak']:.1f}%" if v["fraction_of_peak"] else "-"
        t.add_row(k, v["precision"], f"{v['img_s']:.1f}", f"{v['ms_per_batch']:.1f}",
                  f"{v['min_ms']:.0f}-{v['max_ms']:.0f}",
                  f"{v['speedup']:.2f}x ({v['speedup_paired']:.2f}x)", frac)
    c = console()
    c.print(t)
    hw = r["hardware"]
    if hw.get("peak_source"):
        c.print(f"peak: {hw.get('peak_fp32_gflops') or 0:.0f} GFLOP/s fp32 at "
                f"{hw.get('ghz') or 0:.2f} GHz ({hw['peak_source']})")
    for kind, t in r.get("inference_targets", {}).items():
        if t["best_peer"]:
            c.print(f"{t['path']} / {t['best_peer']} (the fastest {t['precision']} peer): "
                    f"{t['ratio_paired']:.2f}x paired (target 1.0x)")
    for name, p in r.get("peers", {}).items():
        tried = f", fastest of {len(p['tried'])} timed" if p["tried"] else ""
        c.print(f"{name}: " + " ".join(f"{k}={v}" for k, v in p["config"].items()) + tried)
    for n in r["notes"]:
        c.print(n)


def check(r: dict[str, Any]) -> None:
    t = Table("path", "precision", "top-1", "agreement with fp32", "max |diff|", "mean |diff|",
              title=f"{r['checkpoint']} ({r['model']}) on {r['samples']:,} {r['dataset']} test "
                    f"images; largest fp32 logit {r['logit_scale']:.2f}")
    for k, v in r["results"].items():
        t.add_row(k, v["precision"], f"{100 * v['top1']:.2f}%",
                  f"{100 * v['agreement_with_fp32']:.2f}%", f"{v['max_abs_diff']:.2e}",
                  f"{v['mean_abs_diff']:.2e}")
    c = console()
    c.print(t)
    for n in r["notes"]:
        c.print(n)


def recipes(rows: dict[str, dict[str, Any]]) -> None:
    for n, r in rows.items():
        say(f"{n}: model {r.get('model')}, {r.get('epochs')} epochs, {r.get('dataset')}")


def weights(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no published weights match (see `resnetkit weights list`)")
        return
    # the tag is what a user types: never shortened
    t = Table(Column("tag", no_wrap=True, min_width=max(len(w["tag"]) for w in rows)),
              "publisher", "top-1", "top-5", "size MB", "eval transform", "license")
    for w in rows:
        pct = lambda v: f"{v:.2f}%" if v is not None else "-"  # noqa: E731
        t.add_row(w["tag"], w["publisher"], pct(w["top1"]), pct(w["top5"]),
                  f"{w['size_mb']:.1f}" if w["size_mb"] else "-",
                  f"{w['resize']} -> {w['crop']} {w['interpolation']}", w["license"])
    console().print(t)
