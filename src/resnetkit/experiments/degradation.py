"""The degradation experiment of the ResNet paper (He et al. 2015, section 4.2, figure 6):
plain networks and ResNets of several depths trained with one recipe, their training and
test error per epoch. Deeper plain nets train worse (higher training error: not
overfitting); with identity shortcuts the deeper net trains at least as well.

Every model is trained with the same recipe, seed, schedule and data order, in a run
folder of its own under OUT/runs/; OUT/experiment.json says what the folder holds, so that a
killed experiment continues model by model (a finished model is read back, an interrupted
one resumes from its last checkpoint) and a folder of another experiment is refused."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..train import Trainer, build_config
from ..untrusted import parse_json, path_component, shown
from ..weights import atomic_write
from ..zoo import get_config

KIND = "degradation"
DEFAULT_MODELS = ("plain20", "plain56", "resnet20", "resnet56")


def _manifest(models: list[str], cfg_fields: dict[str, Any]) -> dict[str, Any]:
    """What OUT/experiment.json holds, as it reads back (tuples as lists)."""
    return json.loads(json.dumps({"experiment": KIND, "models": models, "train": cfg_fields}))


def _claim(out: Path, manifest: dict[str, Any]) -> None:
    """OUT made for this experiment, or found holding this same experiment (a resume)."""
    marker = out / "experiment.json"
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            raise UserError(f"{shown(out)} exists and holds no experiment; choose a new --out")
        found = parse_json(marker.read_bytes(), str(marker), "content")
        if found != manifest:
            what = found.get("experiment") if isinstance(found, dict) else None
            raise UserError(f"{shown(out)} holds another experiment ({shown(what)}, other models "
                            f"or settings); choose a new --out, or repeat its own command to "
                            f"continue it")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(marker, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=1)))


def _train_one(name: str, runs: Path, base: dict[str, Any], say: Callable[[str], None]
               ) -> list[dict[str, Any]]:
    """The model's per-epoch history: read back when its run finished, else trained (or
    resumed from its last checkpoint)."""
    run = runs / name
    if (run / "results.json").is_file() and len(_history(run)) >= base["epochs"]:
        say(f"{name}: finished earlier, read from {run}")
        return _history(run)
    if (run / "config.json").is_file():
        say(f"{name}: continuing from its last checkpoint")
        trainer = Trainer.resume(run)
    else:
        trainer = Trainer(build_config(None, **{**base, "model": name, "out_dir": str(runs),
                                                "name": name}))
    trainer.fit()
    return _history(run)


def _history(run: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl as errors in percent (the test error None where an epoch was
    not evaluated)."""
    if not (run / "metrics.jsonl").is_file():
        return []
    rows = [parse_json(line, str(run / "metrics.jsonl"), "row")
            for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"epoch": r["epoch"], "train_error": round(100 * (1 - r["train_acc"]), 4),
             "test_error": None if r.get("val_acc") is None else round(100 * (1 - r["val_acc"]), 4)}
            for r in rows]


def degradation(models: list[str] | None = None, out: str | Path = "degradation",
                options: dict[str, str] | None = None, recipe: str | None = None,
                say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train each of `models` (preset names, plain and residual) with the same TrainConfig
    (a recipe, then "--key value" options as `resnetkit train` takes them; eval every
    epoch) and write OUT/results.json, {model: [{"epoch", "train_error", "test_error"}]} in
    percent, and OUT/degradation.png (figure 6's layout). Returns the results. Raises
    UserError for an unknown model, a bad option, or an OUT of another experiment."""
    models = list(models or DEFAULT_MODELS)
    if not models or len(set(models)) != len(models):
        raise UserError("--models needs one or more distinct preset names")
    for m in models:
        get_config(path_component(m, "model name"))  # unknown names fail here, before training
    if options and {"model", "out_dir", "name", "eval_every"} & set(options):
        raise UserError("the experiment sets model, out_dir, name and eval_every itself")
    cfg = build_config(recipe, options or {}, eval_every=1, plots=False)
    base = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("model", "out_dir", "name")}
    out = Path(out)
    _claim(out, _manifest(models, base))
    results = {}
    for i, name in enumerate(models, 1):
        say(f"[{i}/{len(models)}] {name}")
        results[name] = _train_one(name, out / "runs", base, say)
    atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(
        json.dumps(results, indent=1)))
    plot_degradation(results, out / "degradation.png")
    return results


def plot_degradation(results: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Figure 6 of the paper: plain nets left, ResNets right; thin lines training error,
    bold lines test error; one colour per depth (the same depth the same colour on both
    sides). None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    depths = sorted({get_config(m).depth for m in results})
    colours = dict(zip(depths, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, plain in zip(axes, (True, False)):
        for name, rows in results.items():
            if (get_config(name).shortcut == "none") != plain:
                continue
            c = colours[get_config(name).depth]
            ep = [r["epoch"] for r in rows]
            ax.plot(ep, [r["train_error"] for r in rows], "-", lw=1, color=c)
            ax.plot(ep, [r["test_error"] for r in rows], "-", lw=2.5, color=c, label=name)
        ax.set(title="plain networks" if plain else "ResNets", xlabel="epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(title="thin: train, bold: test")
    axes[0].set_ylabel("error (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
