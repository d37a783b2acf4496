"""The `resnetkit` command: each verb parses its arguments, calls one library function and
renders the result (tables from `render`, or JSON with --json)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable

from . import render
from .errors import UserError

# verb -> (function, whether it runs networks)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], bool]] = {}


def command(runs_networks: bool = False):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[fn.__name__.removeprefix("cmd_")] = (fn, runs_networks)
        return fn
    return register  # runs_networks: tune the C allocator first (see runtime.tune_allocator)


def _show(a: argparse.Namespace, result: Any, draw: Callable[[Any], Any]) -> int:
    """Print the result as JSON with --json, else draw it; exit status 0."""
    if getattr(a, "json", False):
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        draw(result)
    return 0


def _overrides(items: list[str] | None) -> dict[str, Any]:
    from .options import parse_overrides
    return parse_overrides(items)  # typed by the ResNetConfig field types


@command()
def cmd_models(a: argparse.Namespace) -> int:
    from .zoo import PRESETS, list_models
    rows = {n: PRESETS[n] for n in list_models(a.pattern)}
    return _show(a, {n: {"depth": c.depth, "block": c.block, "layers": list(c.layers)}
                     for n, c in rows.items()} if a.json else rows, render.models)


@command()
def cmd_describe(a: argparse.Namespace) -> int:
    from .analysis.describe import describe, render_describe
    return _show(a, describe(a.model, a.image_size, **_overrides(a.overrides)),
                 lambda walk: print(render_describe(walk, expand=a.expand)))


@command()
def cmd_summary(a: argparse.Namespace) -> int:
    from .analysis.summary import summary
    return _show(a, summary(a.model, a.image_size, a.batch, depth=a.depth or None,
                            **_overrides(a.overrides)), render.summary)


@command()
def cmd_flops(a: argparse.Namespace) -> int:
    from .analysis.summary import block_cost, flops
    if a.block:
        return _show(a, [block_cost(spec, a.image_size) for spec in a.block],
                     lambda rows: render.block_costs(rows, a.image_size))
    if not a.model:
        raise UserError("name a model, or give --block specs")
    return _show(a, flops(a.model, a.image_size, **_overrides(a.overrides)), render.flops)


@command()
def cmd_compare(a: argparse.Namespace) -> int:
    from .analysis.summary import compare
    rows = compare(a.models, a.image_size, memory=not a.no_memory,
                   common=_overrides(a.override))
    return _show(a, rows, lambda rows: render.compare(rows, a.image_size))


@command()
def cmd_diagram(a: argparse.Namespace) -> int:
    from .analysis.describe import describe
    from .analysis.diagram import diagram
    path = diagram(describe(a.model, a.image_size, **_overrides(a.overrides)),
                   a.output or f"{a.model}.svg")
    print(f"wrote {path}")
    return 0


@command(runs_networks=True)
def cmd_train(a: argparse.Namespace) -> int:
    from .train import TrainConfig, start_run
    from .train.distributed import launched, torchrun
    if a.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {a.nproc}")
    if a.nproc > 1 and not launched():
        return torchrun(a.nproc, a.argv)
    options = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)
               if hasattr(a, f.name)}
    trainer = start_run(a.recipe, options, a.resume)
    main_rank = trainer.dist.main
    if main_rank:
        print(render.train_start(trainer), flush=True)
    try:
        r = trainer.fit()
    except KeyboardInterrupt:
        if main_rank:
            print(f"interrupted: resumable checkpoint saved; continue with "
                  f"`resnetkit train --resume {trainer.run_dir}`", file=sys.stderr)
        return 130
    if main_rank:
        print(render.train_result(r))
    return 0


@command(runs_networks=True)
def cmd_eval(a: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint
    r = evaluate_checkpoint(a.checkpoint, a.dataset, a.split, a.data_dir, tta_flip=a.tta_flip)
    return _show(a, r, lambda r: render.evaluation(r, f"{a.checkpoint} on {a.dataset} {a.split}"))


@command(runs_networks=True)
def cmd_predict(a: argparse.Namespace) -> int:
    from .infer import predict
    return _show(a, predict(a.checkpoint, a.images, a.top_k), render.predictions)


@command()
def cmd_export(a: argparse.Namespace) -> int:
    from .infer.export import export_source
    path, model, size = export_source(a.source, a.overrides, a.format, a.output,
                                      a.image_size, fold=not a.no_fold)
    print(f"wrote {path} ({a.format}, dynamic batch, input {model.cfg.in_chans}x{size}x{size})")
    return 0


@command(runs_networks=True)
def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import bench, check
    if a.check:
        return _show(a, check(a.check, a.dataset, a.data_dir, onnx=not a.no_onnx,
                              compile=a.compile, limit=a.limit), render.check)
    return _show(a, bench(a.model, a.batch, a.image_size, a.threads, a.rounds,
                          in_chans=a.in_chans, num_classes=a.num_classes, train=not a.no_train,
                          onnx=not a.no_onnx, compile=a.compile, device=a.device), render.bench)


@command()
def cmd_recipes(a: argparse.Namespace) -> int:
    from .train import load_recipe, recipe_names
    for n in recipe_names():
        r = load_recipe(n)
        print(f"{n}: model {r.get('model')}, {r.get('epochs')} epochs, {r.get('dataset')}")
    return 0


def _model_args(s: argparse.ArgumentParser, image: int = 224, model_required: bool = True) -> None:
    s.add_argument("model", nargs=None if model_required else "?",
                   help="preset name (see `resnetkit models`)")
    s.add_argument("overrides", nargs="*", help="config overrides, key=value")
    s.add_argument("--image-size", type=int, default=image, help="input side in pixels")
    s.add_argument("--json", action="store_true",
                   help="print JSON (schemas in resnetkit/analysis/schemas/)")


def _train_args(s: argparse.ArgumentParser) -> None:
    """Every TrainConfig field as --field (and --field-with-dashes), help from the field."""
    from .options import field_types, kind_name
    from .train import TrainConfig
    s.add_argument("--recipe", default=None, help="recipe name or .toml path")
    s.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue a run")
    s.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (DDP under torchrun; default 1)")
    types = field_types(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = dict.fromkeys([f"--{f.name}", f"--{f.name.replace('_', '-')}"])
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        s.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS,
                       metavar=kind_name(types[f.name]).replace(" or ", "|").upper(),
                       help=f"{f.metadata['help']} (default: {default!r})")


def _verb_args(sub) -> None:
    s = sub.add_parser("describe", help="layer-by-layer walk-through with sizes and depth")
    _model_args(s)
    s.add_argument("--expand", action="store_true", help="show every block, unfolded")

    s = sub.add_parser("summary", help="per-layer table, params, MACs, memory")
    _model_args(s)
    s.add_argument("--batch", type=int, default=1, help="batch size for the memory figures")
    s.add_argument("--depth", type=int, default=2, help="nesting depth of the table (0: all)")

    s = sub.add_parser("flops", help="MACs/FLOPs by op kind and stage, or of single blocks")
    _model_args(s, model_required=False)
    s.add_argument("--block", action="append",
                   help="KIND:IN[->OUT][/STRIDE], e.g. basic:64 or bottleneck:256 (repeatable)")

    s = sub.add_parser("compare", help="models side by side (paper table 1)")
    s.add_argument("models", nargs="+", help="NAME or NAME:key=value,key=value")
    s.add_argument("--override", action="append", help="key=value applied to every model")
    s.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    s.add_argument("--no-memory", action="store_true", help="skip the measured memory column")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("diagram", help="draw the network (SVG, or PNG)")
    _model_args(s)
    s.add_argument("-o", "--output", default=None, help="file .svg or .png (default MODEL.svg)")

    s = sub.add_parser("train", help="train (see `resnetkit recipes`); --key value overrides")
    _train_args(s)

    s = sub.add_parser("eval", help="top-1/top-5, per-class accuracy, confusion matrix")
    s.add_argument("checkpoint", help="a .safetensors file or a run folder")
    _data_args(s)
    s.add_argument("--split", default="test", choices=["train", "test"], help="which split")
    s.add_argument("--tta-flip", action="store_true",
                   help="average the probabilities of each image and its mirror image")
    s.add_argument("--json", action="store_true", help="print JSON")


def _data_args(s: argparse.ArgumentParser, when: str = "") -> None:
    s.add_argument("--dataset", default="fashion-mnist",
                   help=f"fashion-mnist, idx:DIR, cifar:DIR or folder:DIR{when}")
    s.add_argument("--data-dir", default=None, help=f"folder of the dataset's files{when}")


def _runtime_args(sub) -> None:
    s = sub.add_parser("predict", help="top-k classes for image files or folders")
    s.add_argument("checkpoint", help="a .safetensors file, a run folder or an exported .onnx")
    s.add_argument("images", nargs="+", help="image files or folders of them")
    s.add_argument("--top-k", type=int, default=5, help="classes to show per image")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("bench", help="side-by-side throughput against plain PyTorch")
    s.add_argument("model", nargs="?", default="resnet50", help="preset name")
    s.add_argument("--batch", type=int, default=16, help="images per batch")
    s.add_argument("--image-size", type=int, default=224, help="input side in pixels")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    s.add_argument("--rounds", type=int, default=7, help="timed rounds of every path")
    s.add_argument("--in-chans", type=int, default=3, help="input channels")
    s.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    s.add_argument("--no-train", action="store_true", help="skip the training-step paths")
    s.add_argument("--no-onnx", action="store_true",
                   help="skip the engines that run the exported ONNX file (ONNX Runtime, OpenVINO)")
    s.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the fast path (always timed where "
                        "optimize() compiles by default: CUDA, or a CPU with a C++ compiler)")
    s.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda[:N]")
    s.add_argument("--check", metavar="CHECKPOINT", default=None,
                   help="instead of timing: compare every fast path's logits with fp32 on a "
                        "real test set for this trained checkpoint or run folder")
    _data_args(s, " (with --check)")
    s.add_argument("--limit", type=int, default=0, help="with --check: first N test images")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("export", help="ONNX, TorchScript or ExportedProgram, dynamic batch")
    s.add_argument("source", help="checkpoint (.safetensors or run folder) or preset name")
    s.add_argument("overrides", nargs="*", help="config overrides for a preset, key=value")
    s.add_argument("--format", default="onnx", choices=["onnx", "torchscript", "exported-program"],
                   help="file format")
    s.add_argument("-o", "--output", default=None, help="output file (default SOURCE.FORMAT)")
    s.add_argument("--image-size", type=int, default=0, help="default: the checkpoint's, or 224")
    s.add_argument("--no-fold", action="store_true", help="keep BN layers unfolded")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resnetkit", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("models", help="list the presets")
    s.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'resnext*'")
    s.add_argument("--json", action="store_true", help="print JSON")
    _verb_args(sub)
    _runtime_args(sub)
    sub.add_parser("recipes", help="list the shipped training recipes")
    for s in sub.choices.values():
        s.allow_abbrev = False  # --epoch is a mistake, not --epochs
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    fn, runs_networks = COMMANDS[args.command]
    try:
        if runs_networks:
            from .runtime import tune_allocator
            tune_allocator()
        return fn(args)
    except UserError as e:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"resnetkit {args.command}: error{rank}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
