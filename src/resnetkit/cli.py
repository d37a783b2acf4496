"""The `resnetkit` command: each verb parses its arguments (grammar in cli_parser), calls one
library function and renders the result (tables from `render`, or JSON with --json)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from . import render
from .cli_parser import build_parser
from .errors import UserError
from .weights.checkpoint import default_output
from .untrusted import shown

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
                 lambda walk: render.say(*render_describe(walk, expand=a.expand).split("\n")))


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
                   a.output or default_output(f"{a.model}.svg"))
    render.say(f"wrote {path}")
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
        render.say(render.train_start(trainer.describe()))
        sys.stdout.flush()
    try:
        r = trainer.fit()
    except KeyboardInterrupt:
        sig = trainer.stop_signal or signal.SIGINT
        if main_rank:
            print(f"stopped by {signal.Signals(sig).name}: resumable checkpoint saved; continue "
                  f"with `resnetkit train --resume {trainer.run_dir}`", file=sys.stderr)
        return 128 + sig
    if main_rank:
        render.say(*render.train_result(r).splitlines())
    return 0


@command(runs_networks=True)
def cmd_eval(a: argparse.Namespace) -> int:
    from .infer import evaluate_source
    r = evaluate_source(a.checkpoint, a.dataset, a.split, a.data_dir, a.engine, a.precision,
                        a.calibration, tta_flip=a.tta_flip, tta_shift=a.tta_shift)
    return _show(a, r, lambda r: render.evaluation(r, f"{a.checkpoint} on {a.dataset} {a.split}"))


@command(runs_networks=True)
def cmd_predict(a: argparse.Namespace) -> int:
    from .infer import predict
    return _show(a, predict(a.checkpoint, a.images, a.top_k, engine=a.engine,
                            precision=a.precision, calibration=a.calibration),
                 render.predictions)


@command()
def cmd_export(a: argparse.Namespace) -> int:
    from .infer.export import export_source
    if a.precision == "int8":
        if a.opset is not None:
            raise UserError("--opset is for fp32 exports; the int8 file is written at the "
                            "quantizer's opset")
        return _quantize(a.source, a.calibration, a.output, a.data_dir, a.overrides)
    if a.calibration:
        raise UserError("--calibration is for --precision int8 only")
    path, model, size = export_source(a.source, a.overrides, a.format, a.output, a.image_size,
                                      fold=not a.no_fold, dynamic_size=a.dynamic_size,
                                      opset=a.opset)
    dims = "any height and width" if a.dynamic_size else f"{size}x{size}"
    render.say(f"wrote {path} ({a.format}, dynamic batch, {model.cfg.in_chans} channels, {dims})")
    return 0


def _quantize(source: str, calibration: str | None, output: str | None, data_dir: str | None,
              overrides: list[str] | None = None) -> int:
    from .infer.int8_files import quantize_source
    if overrides:
        raise UserError("config overrides apply to a preset name; int8 needs a trained checkpoint")
    if not calibration:
        raise UserError("int8 needs calibration images: add --calibration fashion-mnist:512 "
                        "(or another dataset the checkpoint was trained for)")
    out = output or default_output(f"{Path(source).stem}.int8.onnx")
    r = quantize_source(source, calibration, out, data_dir)
    if r["onnx"]:
        c = r["check"]
        render.say(f"wrote {r['onnx']} (int8 QDQ ONNX, dynamic batch, calibrated on {r['images']} "
              f"images; ONNX Runtime against the quantized PyTorch model on {c['images']} of "
              f"them: top-1 agreement {c['agreement']:.4f}, max logit difference "
              f"{c['max_abs_diff']:.4g})")
    if r["openvino"]:
        render.say(f"wrote {r['openvino']} (int8 OpenVINO IR quantized by NNCF)")
    return 0


@command(runs_networks=True)
def cmd_quantize(a: argparse.Namespace) -> int:
    return _quantize(a.source, a.calibration, a.output, a.data_dir)


@command(runs_networks=True)
def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import bench, check
    if a.check:
        return _show(a, check(a.check, a.dataset, a.data_dir, onnx=not a.no_onnx,
                              compile=a.compile, limit=a.limit, int8=not a.no_int8),
                     render.check)
    return _show(a, bench(a.model, a.batch, a.image_size, a.threads, a.rounds,
                          in_chans=a.in_chans, num_classes=a.num_classes, train=not a.no_train,
                          onnx=not a.no_onnx, compile=a.compile, device=a.device,
                          int8=not a.no_int8, peer_search=a.peer_search), render.bench)


@command(runs_networks=True)
def cmd_serve(a: argparse.Namespace) -> int:
    from .analysis.card import model_card  # the page's model card: analysis, passed in as data
    from .serve import ServeConfig, ServeHooks, serve
    config = ServeConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(ServeConfig)
                            if hasattr(a, f.name)})

    def started(meta: dict[str, Any]) -> None:
        what = a.model if a.model is not None else ", ".join(meta["models"])
        render.say(f"serving {what} at {meta['url']} (page at /, the Open Inference Protocol "
                   f"at /v2, API docs at /docs); SIGTERM or Ctrl-C drains and stops")
        sys.stdout.flush()
    return serve(a.model, config, ServeHooks(card=model_card, on_start=started))


@command(runs_networks=True)
def cmd_experiment(a: argparse.Namespace) -> int:
    if a.experiment == "responses":
        from .experiments import responses
        r = responses(a.runs, a.out, a.dataset, a.data_dir, a.limit, say=render.say)
        for run, v in r["runs"].items():
            render.say(f"{v['model']} ({run}): mean std {sum(v['by_layer']) / len(v['by_layer']):.3f} "
                       f"over {len(v['by_layer'])} layers")
        render.say(f"wrote {Path(a.out) / 'responses.json'} and responses.png")
        return 0
    from .experiments import degradation
    from .train import TrainConfig
    options = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)
               if hasattr(a, f.name)}
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    r = degradation(models, a.out, options, a.recipe, say=render.say)
    for name, rows in r.items():
        last = rows[-1]
        render.say(f"{name}: epoch {last['epoch']}, training error {last['train_error']:.2f}%, "
                   f"test error {last['test_error']:.2f}%")
    render.say(f"wrote {Path(a.out) / 'results.json'} and degradation.png")
    return 0


@command(runs_networks=True)
def cmd_explain(a: argparse.Namespace) -> int:
    from .explain import explain_files
    from .infer.predict import expand_inputs
    r = explain_files(a.source, expand_inputs(a.images), a.output, method=a.method,
                      layer=a.layer, target=a.target)
    if a.json:
        return _show(a, r, None)
    render.predictions(r["images"])
    render.say(f"wrote {r['output']} ({r['method']}" +
               (f" at {r['layer']}" if r.get("layer") else "") + ")")
    return 0


@command()
def cmd_recipes(a: argparse.Namespace) -> int:
    from .train import load_recipe, recipe_names
    return _show(a, {n: load_recipe(n) for n in recipe_names()}, render.recipes)


@command(runs_networks=True)
def cmd_weights(a: argparse.Namespace) -> int:
    from .weights import registry, sources
    if a.action == "list":
        rows = [w.summary() for w in registry.list_weights(a.target or "*")]
        if not rows:  # a pattern that matches nothing is worth saying, and a non-zero exit
            raise UserError(f"no published weights match {a.target!r}; `resnetkit weights "
                            f"list` shows them all")
        return _show(a, rows, render.weights)
    if not a.target:
        raise UserError(f"weights {a.action} needs a TAG (see `resnetkit weights list`)")
    if a.action == "download":
        w, path = sources.fetch(a.target)
        render.say(f"{w.tag}: {path} ({w.hash_kind or 'no'} hash checked)")
    else:
        path = sources.convert(a.target, a.output or default_output(f"{Path(a.target).stem}.safetensors"))
        render.say(f"wrote {path}")
    return 0


def _parse(argv: list[str]) -> argparse.Namespace:
    """The verb's arguments. key=value overrides may also follow the options (`export
    resnet20 -o x.onnx in_chans=1`): argparse leaves those over, they join the overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list) and \
            all("=" in t and not t.startswith("-") for t in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {shown(' '.join(extra))}")
    return args


def _show_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one escaped line: they quote file and folder names (skipped images, a
    checkpoint's head) that came from outside."""
    return f"warning: {shown(message)}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings
    warnings.formatwarning = _show_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    args.argv = argv
    fn, runs_networks = COMMANDS[args.command]
    try:
        if runs_networks:
            from .runtime import tune_allocator
            tune_allocator()
        return fn(args)
    except UserError as e:
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        # one line: the message may quote a file's text, a folder's or a class's name
        print(f"resnetkit {args.command}: error{rank}: {shown(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `resnetkit ... | head`: the reader has gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
