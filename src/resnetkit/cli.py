"""The `resnetkit` command: parse arguments, call the library, render the result."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import UserError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    COMMANDS[fn.__name__.removeprefix("cmd_")] = fn
    return fn


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from .config import parse_override
    return dict(parse_override(t) for t in items or [])


def _emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _console():
    from rich.console import Console
    return Console(width=100) if not sys.stdout.isatty() else Console()


@command
def cmd_models(a: argparse.Namespace) -> int:
    from .zoo import PRESETS, list_models
    names = list_models(a.pattern)
    if a.json:
        _emit_json({n: {"depth": PRESETS[n].depth, "block": PRESETS[n].block,
                        "layers": list(PRESETS[n].layers)} for n in names})
        return 0
    from rich.table import Table
    t = Table("model", "block", "layers", "depth", "groups x width", "stem", "shortcut")
    for n in names:
        c = PRESETS[n]
        t.add_row(n, c.block, str(list(c.layers)), str(c.depth),
                  f"{c.groups}x{c.width_per_group}", c.stem, c.shortcut)
    _console().print(t)
    return 0


def _model_args(s: argparse.ArgumentParser, image: int = 224) -> None:
    s.add_argument("model", help="preset name (see `resnetkit models`)")
    s.add_argument("overrides", nargs="*", help="config overrides, key=value")
    s.add_argument("--image-size", type=int, default=image)
    s.add_argument("--json", action="store_true", help="print JSON (schemas in resnetkit/analysis/schemas/)")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


@command
def cmd_describe(a: argparse.Namespace) -> int:
    from .analysis.describe import describe, render_describe
    walk = describe(a.model, a.image_size, **_overrides(a.overrides))
    if a.json:
        _emit_json(walk)
    else:
        print(render_describe(walk, expand=a.expand))
    return 0


@command
def cmd_summary(a: argparse.Namespace) -> int:
    from .analysis.summary import summary
    s = summary(a.model, a.image_size, a.batch, depth=a.depth, **_overrides(a.overrides))
    if a.json:
        _emit_json(s)
        return 0
    from rich.table import Table
    t = Table("layer", "type", "input", "output", "params", "MACs", title=f"{a.model} summary")
    for r in s["layers"]:
        t.add_row(r["name"], r["type"], "x".join(map(str, r["input"][1:])),
                  "x".join(map(str, r["output"][1:])), _fmt_int(r["params"]), _fmt_int(r["macs"]))
    c = _console()
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
    return 0


@command
def cmd_flops(a: argparse.Namespace) -> int:
    from .analysis.summary import block_cost, flops
    if a.block:
        rows = [block_cost(spec, a.image_size) for spec in a.block]
        if a.json:
            _emit_json(rows)
            return 0
        from rich.table import Table
        t = Table("block", "conv", "in", "out", "weights", "MACs",
                  title=f"block costs at {a.image_size}x{a.image_size}")
        for r in rows:
            for cv in r["convs"]:
                t.add_row(r["spec"], cv["layer"], "x".join(map(str, cv["in"])),
                          "x".join(map(str, cv["out"])), _fmt_int(cv["weights"]),
                          _fmt_int(cv["macs"]))
            t.add_row(r["spec"], "[b]total", "", "", _fmt_int(r["conv_weights"]),
                      f"[b]{r['macs']:,}", end_section=True)
        _console().print(t)
        if len(rows) == 2:
            d = rows[0]["macs"] - rows[1]["macs"]
            print(f"difference: {rows[0]['spec']} - {rows[1]['spec']} = {d:,} MACs")
        return 0
    if not a.model:
        raise UserError("name a model, or give --block specs")
    f = flops(a.model, a.image_size, **_overrides(a.overrides))
    if a.json:
        _emit_json(f)
        return 0
    from rich.table import Table
    kinds = list(f["by_kind"])
    t = Table("part", *kinds, title=f"{a.model} at {a.image_size}x{a.image_size}: MACs (conv, "
              "fc) and elements (others)")
    for st, v in f["per_stage"].items():
        t.add_row(st, *(_fmt_int(v[k]) for k in kinds))
    t.add_row("[b]total", *(f"[b]{f['by_kind'][k]:,}" for k in kinds))
    c = _console()
    c.print(t)
    c.print(f"MACs {f['macs']:,} ({f['macs'] / 1e9:.3f} G)  FLOPs {f['flops']:,}  "
            f"FLOPs incl. BN/ReLU/pool/add/bias {f['flops_all_ops']:,}")
    c.print(f"convention: {f['convention']}")
    return 0


@command
def cmd_compare(a: argparse.Namespace) -> int:
    from .analysis.summary import compare
    common = _overrides(a.override)
    models = []
    for spec in a.models:
        name, _, rest = spec.partition(":")
        models.append((name, {**common, **_overrides([r for r in rest.split(",") if r])}))
    rows = compare(models, a.image_size, memory=not a.no_memory)
    if a.json:
        _emit_json(rows)
        return 0
    from rich.table import Table
    t = Table("model", "depth", "params", "MACs (G)", "FLOPs (G)", "train MB (b=1)",
              "feature maps", title=f"at {a.image_size}x{a.image_size}")
    for r in rows:
        t.add_row(r["model"], str(r["depth"]), _fmt_int(r["params"]), f"{r['macs'] / 1e9:.2f}",
                  f"{r['flops'] / 1e9:.2f}",
                  f"{r['training_mb']:.0f}" if r["training_mb"] is not None else "-",
                  "/".join(map(str, r["feature_maps"])))
    _console().print(t)
    return 0


@command
def cmd_diagram(a: argparse.Namespace) -> int:
    from .analysis.describe import describe
    from .analysis.diagram import diagram
    path = diagram(describe(a.model, a.image_size, **_overrides(a.overrides)), a.output)
    print(f"wrote {path}")
    return 0


def _train_overrides(items: list[str]) -> dict[str, str]:
    """["--epochs", "5", "--lr=0.1"] -> {"epochs": "5", "lr": "0.1"}."""
    out, it = {}, iter(items)
    for tok in it:
        if not tok.startswith("--"):
            raise UserError(f"unexpected argument {tok!r}; options look like --key value")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            val = next(it, None)
            if val is None:
                raise UserError(f"option --{key} needs a value")
        out[key.replace("-", "_")] = val
    return out


@command
def cmd_train(a: argparse.Namespace) -> int:
    from .train import Trainer, build_config
    from .train.distributed import launched
    if a.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {a.nproc}")
    if a.nproc > 1 and not launched():
        return _torchrun(a.nproc, a.argv)
    overrides = _train_overrides(a.options)
    if a.resume:
        changes = {k: int(v) for k, v in overrides.items() if k in ("epochs", "accum_steps")}
        if set(overrides) - set(changes):
            raise UserError("with --resume only --epochs and --accum_steps may be given")
        trainer = Trainer.resume(a.resume, **changes)
    else:
        trainer = Trainer(build_config(a.recipe, overrides))
    say = print if trainer.dist.main else (lambda *_, **__: None)
    b = trainer.batches
    say(f"run folder: {trainer.run_dir} ({trainer.precision}, channels_last="
        f"{trainer.channels_last}, {trainer.device}" +
        (f", {trainer.dist.world} processes ({trainer.dist.backend}), {b.per_rank} per rank x "
         f"{b.accum} accumulation = global batch {b.global_}, lr {b.lr:g}"
         if trainer.dist.active or b.accum > 1 else "") + ")", flush=True)
    try:
        r = trainer.fit()
    except KeyboardInterrupt:
        if trainer.dist.main:
            print(f"interrupted: resumable checkpoint saved; continue with "
                  f"`resnetkit train --resume {trainer.run_dir}`", file=sys.stderr)
        return 130
    if "test_top1_without_tta" in r:
        say(f"test top-1 without test-time flips {100 * r['test_top1_without_tta']:.2f}%")
    say(f"test top-1 {100 * r['test']['top1']:.2f}%  top-5 {100 * r['test']['top5']:.2f}%  "
        f"best {100 * r['best_top1']:.2f}%  train time {r['wall_s']:.0f} s  "
        f"peak memory {r['peak_mem_mb']:.0f} MB  -> {r['run_dir']}")
    return 0


def _torchrun(nproc: int, argv: list[str]) -> int:
    """`resnetkit train --nproc N ...` = torchrun --standalone --nproc-per-node N on this
    machine, with the same arguments minus --nproc."""
    import subprocess
    rest, skip = [], False
    for t in argv:
        if skip:
            skip = False
        elif t == "--nproc":
            skip = True
        elif not t.startswith("--nproc="):
            rest.append(t)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "resnetkit", *rest]
    print("launching: torchrun " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


@command
def cmd_eval(a: argparse.Namespace) -> int:
    from .data import load_dataset, materialize
    from .train.checkpoint import load_model
    from .train.trainer import evaluate
    model, info = load_model(a.checkpoint)
    pre = info.get("preprocess", {})
    data = materialize(load_dataset(a.dataset, a.split, a.data_dir, pre.get("image_size", 0),
                                    model.cfg.in_chans), classes=info.get("classes"))
    if len(data.classes) != model.num_classes:
        raise UserError(f"dataset {a.dataset} has {len(data.classes)} classes, the checkpoint "
                        f"{model.num_classes}")
    r = evaluate(model, data, pre["mean"], pre["std"], pre.get("image_size", 0), tta_flip=a.tta_flip)
    if a.json:
        _emit_json(r)
        return 0
    from rich.table import Table
    t = Table("class", "accuracy", title=f"{a.checkpoint} on {a.dataset} {a.split}: top-1 "
              f"{100 * r['top1']:.2f}%, top-5 {100 * r['top5']:.2f}%, loss {r['loss']:.4f}")
    for name, acc in r["per_class"].items():
        t.add_row(name, f"{100 * acc:.2f}%")
    c = _console()
    c.print(t)
    c.print("confusion matrix (rows: true, columns: predicted)")
    for name, row in zip(data.classes, r["confusion"]):
        c.print(f"{name[:12]:>12} " + " ".join(f"{v:5d}" for v in row))
    return 0


@command
def cmd_predict(a: argparse.Namespace) -> int:
    from .infer import predict
    res = predict(a.checkpoint, a.images, a.top_k)
    if a.json:
        _emit_json(res)
        return 0
    from rich.table import Table
    t = Table("file", "class", "probability")
    for r in res:
        for k, p in enumerate(r["top"]):
            t.add_row(r["file"] if k == 0 else "", p["class"], f"{p['prob']:.4f}",
                      end_section=k == len(r["top"]) - 1)
    _console().print(t)
    return 0


@command
def cmd_export(a: argparse.Namespace) -> int:
    from .infer.export import SUFFIX, export
    meta: dict[str, Any] = {}
    if Path(a.source).exists():
        from .train.checkpoint import load_model
        model, info = load_model(a.source)
        meta = {k: info[k] for k in ("classes", "preprocess") if k in info}
        size = a.image_size or meta.get("preprocess", {}).get("image_size", 224)
    else:
        from .zoo import create_model
        model = create_model(a.source, **_overrides(a.overrides)).eval()
        size = a.image_size or 224
    out = a.output or Path(a.source).stem + SUFFIX[a.format]
    path = export(model, out, a.format, size, fold=not a.no_fold, meta=meta)
    print(f"wrote {path} ({a.format}, dynamic batch, input {model.cfg.in_chans}x{size}x{size})")
    return 0


@command
def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import bench
    if a.check:
        return _bench_check(a)
    r = bench(a.model, a.batch, a.image_size, a.threads, a.rounds, in_chans=a.in_chans,
              num_classes=a.num_classes, train=not a.no_train, onnx=not a.no_onnx,
              compile=a.compile, device=a.device)
    if a.json:
        _emit_json(r)
        return 0
    from rich.table import Table
    t = Table("path", "precision", "img/s", "ms/batch", "min-max ms", "speed-up (paired)",
              "of peak",
              title=f"{a.model}, batch {a.batch}, {a.image_size}x{a.image_size}, "
                    f"{r['hardware']['threads']} threads")
    for k, v in r["results"].items():
        frac = f"{100 * v['fraction_of_peak']:.1f}%" if v["fraction_of_peak"] else "-"
        t.add_row(k, v["precision"], f"{v['img_s']:.1f}", f"{v['ms_per_batch']:.1f}",
                  f"{v['min_ms']:.0f}-{v['max_ms']:.0f}",
                  f"{v['speedup']:.2f}x ({v['speedup_paired']:.2f}x)", frac)
    c = _console()
    c.print(t)
    for n in r["notes"]:
        c.print(n)
    return 0


def _bench_check(a: argparse.Namespace) -> int:
    from .bench import check
    r = check(a.check, a.dataset, a.data_dir, onnx=not a.no_onnx, compile=a.compile,
              limit=a.limit)
    if a.json:
        _emit_json(r)
        return 0
    from rich.table import Table
    t = Table("path", "precision", "top-1", "agreement with fp32", "max |diff|", "mean |diff|",
              title=f"{a.check} ({r['model']}) on {r['samples']:,} {r['dataset']} test images; "
                    f"largest fp32 logit {r['logit_scale']:.2f}")
    for k, v in r["results"].items():
        t.add_row(k, v["precision"], f"{100 * v['top1']:.2f}%",
                  f"{100 * v['agreement_with_fp32']:.2f}%", f"{v['max_abs_diff']:.2e}",
                  f"{v['mean_abs_diff']:.2e}")
    c = _console()
    c.print(t)
    for n in r["notes"]:
        c.print(n)
    return 0


@command
def cmd_recipes(a: argparse.Namespace) -> int:
    from .train import load_recipe, recipe_names
    for n in recipe_names():
        r = load_recipe(n)
        print(f"{n}: model {r.get('model')}, {r.get('epochs')} epochs, {r.get('dataset')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnetkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list the presets")
    s.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'resnext*'")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("describe", help="layer-by-layer walk-through with sizes and depth")
    _model_args(s)
    s.add_argument("--expand", action="store_true", help="show every block, unfolded")

    s = sub.add_parser("summary", help="per-layer table, params, MACs, memory")
    _model_args(s)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--depth", type=int, default=2, help="nesting depth of the table (0: all)")

    s = sub.add_parser("flops", help="MACs/FLOPs by op kind and stage, or of single blocks")
    s.add_argument("model", nargs="?")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--block", action="append",
                   help="KIND:IN[->OUT][/STRIDE], e.g. basic:64 or bottleneck:256 (repeatable)")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("compare", help="models side by side (paper table 1)")
    s.add_argument("models", nargs="+", help="NAME or NAME:key=value,key=value")
    s.add_argument("--override", action="append", help="key=value applied to every model")
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--no-memory", action="store_true", help="skip the measured memory column")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("diagram", help="draw the network (SVG, or PNG)")
    _model_args(s)
    s.add_argument("-o", "--output", default=None, help="file .svg or .png (default MODEL.svg)")

    s = sub.add_parser("train", help="train (see `resnetkit recipes`); --key value overrides")
    s.add_argument("--recipe", default=None, help="recipe name or .toml path")
    s.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run")
    s.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (DDP under torchrun; default 1)")
    s.epilog = "Any TrainConfig field is an option: --epochs 5 --lr 0.05 --model resnet32 ..."

    s = sub.add_parser("eval", help="top-1/top-5, per-class accuracy, confusion matrix")
    s.add_argument("checkpoint", help="a .safetensors file or a run folder")
    s.add_argument("--dataset", default="fashion-mnist")
    s.add_argument("--data-dir", default=None)
    s.add_argument("--split", default="test", choices=["train", "test"])
    s.add_argument("--tta-flip", action="store_true",
                   help="average the probabilities of each image and its mirror image")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("predict", help="top-k classes for image files or folders")
    s.add_argument("checkpoint")
    s.add_argument("images", nargs="+")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--json", action="store_true")

    sub.add_parser("recipes", help="list the shipped training recipes")

    s = sub.add_parser("bench", help="side-by-side throughput against plain PyTorch")
    s.add_argument("model", nargs="?", default="resnet50")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--image-size", type=int, default=224)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--rounds", type=int, default=7)
    s.add_argument("--in-chans", type=int, default=3)
    s.add_argument("--num-classes", type=int, default=1000)
    s.add_argument("--no-train", action="store_true")
    s.add_argument("--no-onnx", action="store_true",
                   help="skip the engines that run the exported ONNX file (ONNX Runtime, OpenVINO)")
    s.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the fast path (always timed where "
                        "optimize() compiles by default: CUDA, or a CPU with a C++ compiler)")
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda[:N]")
    s.add_argument("--check", metavar="CHECKPOINT", default=None,
                   help="instead of timing: compare every fast path's logits with fp32 on a "
                        "real test set for this trained checkpoint or run folder")
    s.add_argument("--dataset", default="fashion-mnist", help="with --check")
    s.add_argument("--data-dir", default=None, help="with --check")
    s.add_argument("--limit", type=int, default=0, help="with --check: first N test images")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("export", help="ONNX, TorchScript or ExportedProgram, dynamic batch")
    s.add_argument("source", help="checkpoint (.safetensors or run folder) or preset name")
    s.add_argument("overrides", nargs="*", help="config overrides for a preset, key=value")
    s.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "exported-program"])
    s.add_argument("-o", "--output", default=None)
    s.add_argument("--image-size", type=int, default=0, help="default: the checkpoint's")
    s.add_argument("--no-fold", action="store_true", help="keep BN layers unfolded")

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":
        args.options = extra  # TrainConfig fields, checked by build_config
        args.argv = argv
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "command", None) == "diagram" and args.output is None:
        args.output = f"{args.model}.svg"
    if getattr(args, "depth", 1) == 0:
        args.depth = None
    try:
        if args.command in ("train", "eval", "predict", "bench"):
            from .runtime import tune_allocator
            tune_allocator()
        return COMMANDS[args.command.replace("-", "_")](args)
    except UserError as e:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"resnetkit {args.command}: error{rank}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
