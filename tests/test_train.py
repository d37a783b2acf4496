"""Trainer, checkpoints, resume, bad input; small real Fashion-MNIST runs (fp32, deterministic)."""
import importlib.util
import json
import os
import signal

import pytest
import torch
from PIL import Image

import resnetkit as rk
from resnetkit.cli import main
from conftest import TINY as BASE
from resnetkit.errors import UserError
from resnetkit.infer import predict
from resnetkit.train import NonFiniteLoss, Trainer, build_config
from resnetkit.weights import checkpoint as ckpt
from resnetkit.runtime.compiling import can_compile
from resnetkit.train.optim import lr_factor

# one process runs this file's tests, so its module fixtures are built once (see pyproject)
pytestmark = pytest.mark.xdist_group("test_train")

# the target for the speedrun recipe: 94.0% test top-1 (flip TTA allowed)
SPEEDRUN_TARGET = 0.94
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
SPEEDRUN_FLOOR = 0.935  # below the lowest seed measured (93.98% with flip + shift TTA)

# conftest's tiny config with 16 steps an epoch (2,048 images), 2 epochs and augmentation
# (alternating flips: the exact resumes below cover them)
TINY = dict(BASE, train_subset=2048, epochs=2, crop_padding=2, hflip=True, alternate_flip=True,
            test_subset=500, quiet=None)


def tiny(tmp_path, name="run", **kw):
    vals = {**TINY, **kw}
    vals.pop("quiet")
    return Trainer(build_config(None, out_dir=str(tmp_path), name=name, **vals), quiet=True)


def weights(t):
    return {k: v.clone() for k, v in t.model.state_dict().items()}


def test_fit_writes_run_folder(tmp_path):
    # the wider net (8, 16, 32) of the accuracy check below: 2 epochs take it well past chance
    t = tiny(tmp_path, plots=True, test_subset=0, tensorboard=HAS_TENSORBOARD,
             model_overrides={"widths": (8, 16, 32), "stem_width": 8})
    r = t.fit()
    d = tmp_path / "run"
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "metrics.jsonl", "last.safetensors", "last.state.pt",
            "best.safetensors", "best.state.pt", "results.json", "curves.png", "confusion.png"
            } | ({"tb"} if HAS_TENSORBOARD else set()) <= names
    if HAS_TENSORBOARD:  # the tensorboard extra, part of [all]
        _check_tensorboard(d, t, r)
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and all(row["images_per_s"] > 0 for row in rows)
    info = json.loads((d / "config.json").read_text())
    assert info["train"]["epochs"] == 2 and info["model"]["in_chans"] == 1 and "torch" in info["versions"]
    # a run of seconds is not compiled, and the decision is kept for a resume
    assert info["train"]["compile"] is False and info["resolved"]["compile"] is False
    assert info["resolved"]["compile_why"] in ("no C++ compiler for torch.compile", "fp64") or \
        info["resolved"]["compile_why"].startswith(("a short run", "the fused BN kernels"))
    assert r["test"]["samples"] == 10_000 and 0.3 < r["test"]["top1"] <= 1  # chance is 0.1
    assert sum(sum(row) for row in r["test"]["confusion"]) == 10_000
    assert not [p for p in names if p.startswith(".")]  # no temporary files left


def _check_tensorboard(d, t, r):
    """The run's TensorBoard log as TensorBoard reads it: the loss and lr of every step, the
    epochs' metrics, and the hyperparameters with the final metrics."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(d / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    losses = acc.Scalars("step/train_loss")
    assert [e.step for e in losses] == list(range(1, t.global_step + 1)) == \
        [e.step for e in acc.Scalars("step/lr")]
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    n = t.steps_per_epoch  # equal batches (drop_last): an epoch's loss is its steps' mean
    for i, row in enumerate(rows):
        mean = sum(e.value for e in losses[i * n:(i + 1) * n]) / n
        assert mean == pytest.approx(row["train_loss"], rel=1e-5)
    assert [(e.step, e.value) for e in acc.Scalars("epoch/val_acc")] == \
        [(n * row["epoch"], pytest.approx(row["val_acc"])) for row in rows]
    lrs = {e.step: e.value for e in acc.Scalars("step/lr")}
    assert lrs[1] == pytest.approx(TINY["lr"] * lr_factor(t.cfg, t.total_steps, n)(0))
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == TINY["lr"]
    assert start.hparams["model"].string_value == "resnet20"
    assert start.hparams["precision"].string_value == "fp32"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    assert "hparam/test_top1" in {m.name.tag for m in experiment.metric_infos}
    assert acc.Scalars("hparam/test_top1")[-1].value == pytest.approx(r["test"]["top1"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """TINY trained to its end without a stop: what every exact resume must equal."""
    t = tiny(tmp_path_factory.mktemp("full"), "full")
    t.fit()
    return weights(t)


def test_resume_after_epoch_is_bitwise_identical(tmp_path, full_run):
    part = tiny(tmp_path, "part")
    part.fit(until_epoch=1)
    resumed = Trainer.resume(tmp_path / "part", quiet=True)
    assert resumed.epoch == 1
    resumed.fit()
    a, b = full_run, weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not can_compile("cpu"), reason="torch.compile needs a C++ compiler")
def test_a_compiled_run_resumes_bitwise_exactly(tmp_path):
    # the resumed process compiles the same graphs again (Inductor's code is deterministic
    # on the CPU), so it continues exactly where the uninterrupted compiled run went
    full = tiny(tmp_path, "full", compile=True)
    full.fit()
    part = tiny(tmp_path, "part", compile=True)
    part.fit(until_epoch=1)
    resumed = Trainer.resume(tmp_path / "part", quiet=True)
    assert resumed.compiled and resumed.cfg.compile is True
    resumed.fit()
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "full" / "results.json").read_text())["compile_s"] > 0


def test_ctrl_c_mid_epoch_saves_and_resumes_exactly(tmp_path, monkeypatch, full_run):
    t = tiny(tmp_path, "cut")
    real = Trainer.train_step
    calls = {"n": 0}

    def step(self, micro, n=None):
        calls["n"] += 1
        out = real(self, micro, n)
        if calls["n"] == 18:  # Ctrl-C during epoch 2, batch 2
            os.kill(os.getpid(), signal.SIGINT)
        return out
    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    monkeypatch.setattr(Trainer, "train_step", real)
    resumed = Trainer.resume(tmp_path / "cut", quiet=True)
    assert (resumed.epoch, resumed.step_in_epoch) == (1, 2)
    resumed.fit()
    a, b = full_run, weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    t = tiny(tmp_path)
    real = Trainer.train_step

    def step(self, micro, n=None):
        loss, ok = real(self, micro, n)
        return (loss * float("nan"), ok) if self.global_step == 17 else (loss, ok)
    monkeypatch.setattr(Trainer, "train_step", step)
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 18 \(epoch 2, batch 2\)"):
        t.fit()
    state = ckpt.load_state(tmp_path / "run" / "last.state.pt")
    assert state["epoch"] == 1 and state["global_step"] == 16
    model, info = ckpt.load_model(tmp_path / "run" / "last.safetensors")
    assert all(torch.isfinite(p).all() for p in model.parameters()) and info["epoch"] == 1


def test_atomic_checkpoint_survives_failed_write(tmp_path, monkeypatch):
    t = tiny(tmp_path, epochs=1)
    t.fit()
    path = tmp_path / "run" / "last.safetensors"
    before = path.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(UserError, match="cannot write checkpoint .*No space left"):
        t.save("last")
    assert path.read_bytes() == before
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    t = Trainer(build_config(None, out_dir=str(tmp_path / "file"), name="r",
                             **{k: v for k, v in TINY.items() if k != "quiet"}), quiet=True)
    with pytest.raises(UserError, match="cannot write to run folder"):
        t.fit()


def test_the_run_folder_writes_what_it_is_given(tmp_path):
    """RunFolder knows nothing of a trainer: it claims and locks its folder and writes the
    config, metrics and results it is handed."""
    from resnetkit.train.runs import RunFolder
    run = tmp_path / "r"
    f = RunFolder(run)
    f.open({"train": {"epochs": 1}}, [{"epoch": 1, "train_loss": float("nan")}], tensorboard=False)
    try:
        assert json.loads((run / "config.json").read_text()) == {"train": {"epochs": 1}}
        f.log_epoch({"epoch": 2, "train_loss": 0.5}, 2)
        assert (run / "metrics.jsonl").read_text() == \
            '{"epoch": 1, "train_loss": null}\n{"epoch": 2, "train_loss": 0.5}\n'
        with pytest.raises(UserError, match="another process is training in"):
            RunFolder(run, resuming=True).open({}, [], tensorboard=False)
        f.write_results({"epochs": 2})
    finally:
        f.close()
    assert f.last_good() == "No checkpoint had been written yet"
    with pytest.raises(UserError, match="already holds a run.*--resume"):
        RunFolder(run).open({}, [], tensorboard=False)  # a new run never adopts a folder
    again = RunFolder(run, resuming=True)
    again.open({"train": {"epochs": 2}}, [], tensorboard=False)  # its own resume may
    again.close()
    assert (run / "metrics.jsonl").read_text() == ""  # no row of an epoch the state lacks
    assert json.loads((run / "results.json").read_text()) == {"epochs": 2}


def test_checkpoint_for_another_architecture(tmp_path):
    t = tiny(tmp_path, epochs=1)
    t.fit()
    _, w, _ = ckpt.read_checkpoint(tmp_path / "run")
    other = rk.create_model("resnet32", in_chans=1, widths=(4, 8, 8), stem_width=4)
    # resnet32 has 2 more basic blocks per stage: 6 blocks x (2 conv weights + 2 BN x 5) = 72 keys
    with pytest.raises(UserError, match="does not fit this model: missing 72 keys"):
        ckpt.load_weights_into(other, w, "run")
    fewer = rk.create_model("resnet20", in_chans=1, widths=(4, 8, 8), stem_width=4, num_classes=5)
    with pytest.raises(UserError, match=r"shape mismatch: fc.weight \(10, 8\) vs \(5, 8\)"):
        ckpt.load_weights_into(fewer, w, "run")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a safetensors checkpoint"):
        ckpt.load_model(tmp_path / "junk.safetensors")


def test_predict_and_eval_from_checkpoint(tmp_path, capsys):
    t = tiny(tmp_path, epochs=1)
    t.fit()
    imgs = t.test_data.images[:3, 0].numpy()
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"img{i}.png")
    res = predict(tmp_path / "run", [tmp_path / f"img{i}.png" for i in range(3)], top_k=3)
    assert len(res) == 3 and all(len(r["top"]) == 3 for r in res)
    assert res[0]["top"][0]["class"] in t.test_data.classes
    assert all(abs(sum(p["prob"] for p in r["top"]) - 1) < 1 for r in res)
    # the same prediction as the model on the dataset tensor itself
    from resnetkit.evaluate import preprocess
    model, info = ckpt.load_model(tmp_path / "run")
    with torch.no_grad():
        ref = model(preprocess(t.test_data.images[:3], t.mean, t.std)).softmax(1).argmax(1)
    assert [r["top"][0]["index"] for r in res] == ref.tolist()
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="cannot decode"):
        predict(tmp_path / "run", [tmp_path / "bad.png"])
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 10_000 and len(out["per_class"]) == 10
    assert main(["eval", str(tmp_path / "run"), "--tta-shift", "5"]) == 2
    assert capsys.readouterr().err.strip() == ("resnetkit eval: error: --tta-shift must be from "
                                               "0 to 4 pixels, got 5")


def test_lr_schedules():
    cfg = build_config(None, schedule="step", milestones=[0.5, 0.75], lr=0.1)
    f = lr_factor(cfg, 100, 10)
    assert [f(0), f(49), f(50), f(74), f(75), f(99)] == [1, 1, pytest.approx(0.1), pytest.approx(0.1),
                                                          pytest.approx(0.01), pytest.approx(0.01)]
    warm = lr_factor(build_config(None, schedule="cosine", warmup_epochs=1), 100, 10)
    assert warm(0) == pytest.approx(0.1) and warm(9) == 1 and warm(99) < 0.01
    one = lr_factor(build_config(None, schedule="onecycle"), 100, 10)
    assert one(0) == pytest.approx(1 / 25) and one(30) == pytest.approx(1) and one(99) < 0.01


def test_no_weight_decay_on_bn_and_bias(tmp_path):
    t = tiny(tmp_path)
    decay, no_decay = t.optimizer.param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and no_decay["weight_decay"] == 0
    bn = sum(m.weight.numel() + m.bias.numel() for m in t.model.modules()
             if isinstance(m, torch.nn.BatchNorm2d))
    assert sum(p.numel() for p in no_decay["params"]) == bn + t.model.fc.bias.numel()
    # the BN parameters' own rate and decay (bn_lr_mult, bn_weight_decay), the rest unchanged
    t2 = tiny(tmp_path, "bn", bn_lr_mult=3.0, bn_weight_decay=1e-5)
    decay2, no_decay2 = t2.optimizer.param_groups
    assert no_decay2["initial_lr"] == pytest.approx(3 * decay2["initial_lr"])
    assert decay2["initial_lr"] == pytest.approx(decay["initial_lr"])
    assert (no_decay2["weight_decay"], decay2["weight_decay"]) == (1e-5, decay["weight_decay"])


def test_bn_scales_fixed_at_one_while_the_shifts_learn(tiny_config):
    # airbench's BN: gamma stays 1 (no gradient, not in the optimizer), beta learns
    t = Trainer(tiny_config("bsf", bn_scale_fixed=True, epochs=1), quiet=True)
    bns = [m for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.weight.requires_grad for m in bns)
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not any(id(m.weight) in in_opt for m in bns)
    assert all(id(m.bias) in in_opt for m in bns)
    shifts = [m.bias.detach().clone() for m in bns]
    t.fit()
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert any(not torch.equal(m.bias, b) for m, b in zip(bns, shifts))
    with pytest.raises(UserError, match="bn_scale_fixed=True is invalid.*zero_init_residual"):
        build_config(None, {"bn_scale_fixed": "true",
                            "model_overrides": "zero_init_residual=true"})


def test_the_fused_optimizer_step_equals_the_plain_one(tmp_path):
    # build_optimizer's fused SGD (Nesterov, decay on the 2-D weights only) against
    # torch.optim.SGD's loop over the same groups: the same update to rounding
    t = tiny(tmp_path, nesterov=True)
    assert t.optimizer.defaults["fused"]
    model = t.model
    plain = torch.optim.SGD([dict(g, params=list(g["params"]), fused=False, foreach=False)
                             for g in t.optimizer.param_groups],
                            lr=t.cfg.lr, momentum=t.cfg.momentum, nesterov=True)
    assert not any(g["fused"] or g["foreach"] for g in plain.param_groups)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    after = []
    for opt in (t.optimizer, plain):
        model.load_state_dict(start)
        for _ in range(2):  # the second step uses the momentum buffers
            for p, gr in zip(model.parameters(), grads):
                # laid out as its parameter (channels_last where the trainer picks it), as
                # autograd lays out a gradient: torch's fused CPU step pairs the two tensors'
                # elements in memory order, so a plain-strided gradient of a channels_last
                # weight would be applied to the wrong elements
                p.grad = torch.empty_like(p).copy_(gr)
            opt.step()
        after.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*after):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bad_train_options():
    with pytest.raises(UserError, match="unknown train option.*epoch"):
        build_config(None, {"epoch": "3"})
    with pytest.raises(UserError, match="epochs expects a int"):
        build_config(None, {"epochs": "many"})
    with pytest.raises(UserError, match="schedule='linear' is invalid"):
        build_config(None, {"schedule": "linear"})
    with pytest.raises(UserError, match="unknown recipe 'nope'"):
        build_config("nope")
    with pytest.raises(UserError, match="alternate_flip=True is invalid.*needs hflip"):
        build_config(None, {"alternate_flip": "true"})
    with pytest.raises(UserError, match=r"seed=.*is invalid.*2\*\*31"):
        build_config(None, {"seed": str(2 ** 40)})


def test_a_whitened_stem_decorrelates_the_patches_and_stays_fixed(tiny_config):
    # widths 16: the first conv has 16 filters for the 9 dimensions of a 3x3 grey patch, so
    # 8 leading eigen-directions and their negatives
    cfg = tiny_config("white", whiten_stem=True, epochs=1,
                      model_overrides={"widths": (16, 16, 16), "stem_width": 16})
    t = Trainer(cfg, quiet=True)
    conv = t.model.conv1
    w = conv.weight.detach().clone()
    assert not conv.weight.requires_grad
    assert torch.equal(w[8:], -w[:8])
    # checked independently of the eigen-decomposition: the 8 channels' responses to the
    # training images (normalised here by hand) have unit variance and no correlation
    images = t.train_data.images.float() / 255
    mean, std = t.feed.mean[0], t.feed.std[0]
    out = torch.nn.functional.conv2d((images - mean) / std, w[:8].float())
    r = out.transpose(0, 1).reshape(8, -1).double()
    cov = torch.cov(r)
    assert torch.allclose(cov.diagonal(), torch.ones(8, dtype=torch.float64), atol=0.06)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-3
    layer1 = t.model.layer1[0].conv1.weight.detach().clone()
    t.fit()
    assert torch.equal(t.model.conv1.weight, w)  # fixed: no gradient, no weight decay
    assert not torch.equal(t.model.layer1[0].conv1.weight, layer1)
    with pytest.raises(UserError, match="whiten_stem.*cannot start from --init"):
        build_config(None, {"whiten_stem": "true", "init": "resnet18.tv_in1k"})


def test_recipes_load():
    for name in ("fashion-mnist-quick", "fashion-mnist-speedrun", "fashion-mnist-15min",
                 "fashion-mnist-best", "cifar10-paper"):
        cfg = build_config(name)
        rk.get_config(cfg.model, **cfg.model_overrides)
    paper = build_config("cifar10-paper")
    # the paper: 64k iterations at batch 128 on 50k images, lr / 10 at 32k and 48k
    assert paper.epochs * (50_000 // 128) == pytest.approx(64_000, rel=0.01)
    assert [m * 64_000 for m in paper.milestones] == [32_000, 48_000]


def test_the_speedrun_recipe_shortened(tmp_path):
    # the recipe as it is, on 1,024 training images for one epoch: every piece of it runs
    # (the full run is the slow test below)
    cfg = build_config("fashion-mnist-speedrun", train_subset=1024, test_subset=500, epochs=1,
                       out_dir=str(tmp_path), name="short", plots=False)
    assert cfg.alternate_flip and cfg.ema_decay and cfg.tta_flip and cfg.label_smoothing == 0
    assert cfg.whiten_stem and cfg.tta_shift == 1
    r = Trainer(cfg, quiet=True).fit()
    assert r["tta_flip"] and r["tta_shift"] == 1 and r["test"]["samples"] == 500 and 0 < r["wall_s"]
    assert r["compiled"] is False  # a short run is not compiled


@pytest.mark.slow
def test_the_speedrun_recipe_within_its_time(tmp_path):
    from resnetkit.runtime import has_native_bf16
    # the suite computes on one thread a process (conftest); the recipe's time is on all cores
    r = Trainer(build_config("fashion-mnist-speedrun", out_dir=str(tmp_path), name="full",
                             threads=os.cpu_count() or 1), quiet=True).fit()
    budget = 180 if has_native_bf16() else 360  # seconds of training (issue's targets)
    assert r["wall_s"] <= budget
    # The target is 94.0% (SPEEDRUN_TARGET): 13 epochs with the fused BN kernels gave
    # 94.00-94.09% over 3 seeds on a Xeon and 94.10-94.14% on an AMD EPYC (docs/training.md),
    # at the edge of the seeds' spread, so one run is held to a floor below all of them; the
    # target is reported.
    assert r["test"]["top1"] >= SPEEDRUN_FLOOR


def test_cli_train_and_resume(tmp_path, capsys):
    args = ["train", "--epochs", "1", "--train-subset", "256", "--test-subset", "500",
            "--batch-size", "128",
            "--precision", "fp32", "--plots", "false", "--out-dir", str(tmp_path), "--name", "cli"]
    assert main(args) == 0
    assert "test top-1" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "cli"), "--epochs", "2"]) == 0
    rows = (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2
    assert main(["train", "--resume", str(tmp_path / "cli"), "--lr", "1"]) == 2


def test_dataset_statistics_are_exact():
    import numpy as np
    from resnetkit.data import ArrayDataset
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (300, 3, 9, 7), dtype=torch.uint8, generator=g)
    d = ArrayDataset(imgs, torch.zeros(300, dtype=torch.long), ["a"])
    ref = imgs.numpy().astype(np.float64) / 255
    assert np.allclose(d.mean, ref.mean((0, 2, 3)), rtol=0, atol=1e-13)
    assert np.allclose(d.std, ref.std((0, 2, 3), ddof=1), rtol=0, atol=1e-13)


def _tta_case():
    """A tiny model, 40 random 12x12 images with labels, their dataset, and the images
    normalised by hand (mean 0.5, std 0.25)."""
    from resnetkit.data import ArrayDataset
    torch.manual_seed(0)
    model = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, in_chans=1, num_classes=3).eval()
    imgs = torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8)
    labels = torch.randint(0, 3, (40,))
    d = ArrayDataset(imgs, labels, ["a", "b", "c"], (0.5,), (0.25,))
    return model, labels, d, (imgs.float() / 255 - 0.5) / 0.25


def test_tta_flip_averages_the_probabilities_of_both_views():
    from resnetkit.evaluate import evaluate
    model, labels, d, x = _tta_case()
    r = evaluate(model, d, d.mean, d.std, tta_flip=True, batch_size=16)
    with torch.no_grad():
        p = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    assert r["top1"] == (p.argmax(1) == labels).sum().item() / 40
    assert r["loss"] == pytest.approx(-p[torch.arange(40), labels].log().mean().item(), rel=1e-5)
    plain = evaluate(model, d, d.mean, d.std)
    assert plain["loss"] != pytest.approx(r["loss"], rel=1e-5)  # the flip view changes the result


def test_tta_shift_adds_four_moved_views_at_half_weight():
    from resnetkit.evaluate import evaluate
    model, labels, d, x = _tta_case()
    r = evaluate(model, d, d.mean, d.std, tta_flip=True, tta_shift=2, batch_size=16)

    def moved(v, dy, dx):  # by indexing: pixel (i, j) of the view is (i + dy, j + dx), clamped
        rows = (torch.arange(12) + dy).clamp(0, 11)
        cols = (torch.arange(12) + dx).clamp(0, 11)
        return v[:, :, rows][:, :, :, cols]

    with torch.no_grad():
        views = [x, x.flip(-1)]
        probs = [model(v).softmax(1) for v in views]
        probs += [model(moved(v, dy, dx)).softmax(1) / 2 for v in views
                  for dy, dx in ((0, 2), (0, -2), (2, 0), (-2, 0))]
        p = sum(probs) / 6  # weights 1 + 1 + 8 x 1/2
    assert r["top1"] == (p.argmax(1) == labels).sum().item() / 40
    assert r["loss"] == pytest.approx(-p[torch.arange(40), labels].log().mean().item(), rel=1e-5)
    flip_only = evaluate(model, d, d.mean, d.std, tta_flip=True, batch_size=16)
    assert flip_only["loss"] != pytest.approx(r["loss"], rel=1e-5)


def test_eval_every_skips_intermediate_evaluations(tmp_path):
    t = tiny(tmp_path, epochs=3, eval_every=2, train_subset=512, test_subset=500, plots=True)
    r = t.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["val_acc"] is None for row in rows] == [True, False, False]  # epochs 2 and 3 (last)
    assert r["test"]["top1"] == rows[-1]["val_acc"] and r["best_top1"] == max(rows[1]["val_acc"], rows[2]["val_acc"])
    assert (tmp_path / "run" / "curves.png").exists()


def test_ema_follows_the_warmed_up_decay():
    from resnetkit.train.optim import build_ema, ema_decay_at
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = build_ema(net, 0.99)
    expect = None
    for n in range(5):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        net[1].num_batches_tracked += 1
        w = net[0].weight.detach().clone()
        # the first update copies; update n (n >= 1) moves by 1 - min(0.99, (1 + n) / (10 + n))
        expect = w if expect is None else expect + (1 - ema_decay_at(0.99, n)) * (w - expect)
        ema.update_parameters(net)
    assert torch.allclose(ema.module[0].weight, expect, atol=1e-6)
    assert ema_decay_at(0.99, 1) == pytest.approx(2 / 11) and ema_decay_at(0.99, 10_000) == 0.99
    assert int(ema.module[1].num_batches_tracked) == 5


def fashion_folder(root, per_class=40, classes=3):
    """Fashion-MNIST test images saved as PNG files under root/{train,test}/CLASS/."""
    from resnetkit.data import load_dataset
    d = load_dataset("fashion-mnist", "test")
    for split, start in (("train", 0), ("test", 5000)):
        for c in range(classes):
            folder = root / split / d.classes[c].replace("/", "-")
            folder.mkdir(parents=True)
            idx = ((d.labels[start:] == c).nonzero()[:per_class, 0] + start).tolist()
            for i in idx:
                Image.fromarray(d.images[i, 0].numpy()).save(folder / f"{i}.png")
    return root


def test_streamed_image_folder_trains_exactly_like_the_cached_one(tmp_path):
    from resnetkit.data import ArrayDataset, StreamedFolder
    root = fashion_folder(tmp_path / "data")
    kw = dict(dataset=f"folder:{root}", image_size=28, batch_size=32, epochs=2,
              model_overrides={**TINY["model_overrides"], "in_chans": 1})
    cached = tiny(tmp_path, "cached", cache_images="true", **kw)
    streamed = tiny(tmp_path, "streamed", cache_images="false", workers=2, **kw)
    assert isinstance(cached.train_data, ArrayDataset)
    assert isinstance(streamed.train_data, StreamedFolder)
    assert isinstance(streamed.test_data, StreamedFolder)
    assert len(streamed.train_data) == len(cached.train_data) == 120
    # exact statistics from the histogram pass, equal to those of the decoded array
    assert streamed.mean == cached.mean and streamed.std == cached.std
    a, b = cached.fit(), streamed.fit()
    wa, wb = weights(cached), weights(streamed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["test"]["top1"] == b["test"]["top1"] > 1 / 3
    assert a["test"]["confusion"] == b["test"]["confusion"]
    sub = streamed.train_data.subset(torch.tensor([5, 0, 7]))
    assert sub.mean == streamed.mean and sub.labels.tolist() == streamed.train_data.labels[[5, 0, 7]].tolist()
    got = torch.cat(list(sub.batches([torch.tensor([0, 1]), torch.tensor([2])])))
    assert torch.equal(got, cached.train_data.images[[5, 0, 7]])


def test_cache_images_auto_follows_memory(tmp_path):
    from resnetkit.data import StreamedFolder, in_memory_or_streamed
    from resnetkit.data.lookup import fits_in_memory
    from resnetkit.data.readers import ImageFolder
    # 1.28 M ImageNet-size images (3 x 224 x 224, 193 GB decoded) do not fit in 24 GiB
    assert not fits_in_memory(1_281_167, (3, 224, 224), total=24 << 30)
    assert fits_in_memory(60_000, (1, 28, 28), total=24 << 30)
    assert fits_in_memory(10, (3, 8, 8), share=0.25, total=4 * 1920)  # 1,920 bytes
    assert not fits_in_memory(10, (3, 8, 8), share=0.25, total=4 * 1920 - 1)
    root = fashion_folder(tmp_path / "data", per_class=2, classes=2)
    folder = ImageFolder(root / "train", 28, 1)
    assert isinstance(in_memory_or_streamed(folder, "false"), StreamedFolder)
    assert not isinstance(in_memory_or_streamed(folder, "auto"), StreamedFolder)
    with pytest.raises(UserError, match="cache_images"):
        build_config(None, cache_images="sometimes")


def test_a_model_of_some_classes_is_evaluated_and_calibrated_on_those(tmp_path, capsys):
    # a checkpoint that knows three Fashion-MNIST classes, in its own order (as `train
    # --classes 8,0,7` or the transfer recipe writes): eval and int8 calibration read only
    # their images, labelled in the checkpoint's order
    from resnetkit.data import load_dataset
    from resnetkit.evaluate import open_eval
    from resnetkit.infer.quantize import calibration_set
    names = ["Bag", "T-shirt/top", "Sneaker"]  # dataset indices 8, 0, 7
    torch.manual_seed(0)
    model = rk.create_model("resnet20", in_chans=1, num_classes=3).eval()
    pre = {"mean": [0.29], "std": [0.35], "image_size": 28, "in_chans": 1}
    ckpt.save_weights(tmp_path / "w.safetensors", model, {"classes": names, "preprocess": pre})
    raw = load_dataset("fashion-mnist", "test")
    e = open_eval(tmp_path / "w.safetensors")
    assert e.data.classes == names and len(e.data) == 3000  # 1,000 test images a class
    for new, old in enumerate((8, 0, 7)):
        assert torch.equal(e.data.images[e.data.labels == new], raw.images[raw.labels == old])
    assert main(["eval", str(tmp_path / "w.safetensors"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 3000 and list(out["per_class"]) == names
    train = load_dataset("fashion-mnist", "train")
    allowed = {bytes(x.numpy()) for x in train.images[(train.labels == 8) | (train.labels == 0)
                                                      | (train.labels == 7)]}
    batches = calibration_set("fashion-mnist:64", 1, preprocess=pre, classes=names)
    pixels = torch.cat(batches) * 0.35 + 0.29  # back to [0, 1]
    assert len(pixels) == 64
    assert all(bytes((p[0] * 255).round().byte().numpy()) in allowed for p in pixels)


def test_a_model_of_some_classes_on_an_image_folder(tmp_path):
    # the same for a folder dataset: its class names come from its directories
    from resnetkit.evaluate import open_eval
    from resnetkit.infer.quantize import calibration_set
    root = fashion_folder(tmp_path / "data", per_class=6, classes=3)  # 3 class directories
    names = ["Trouser", "Pullover"]
    torch.manual_seed(0)
    model = rk.create_model("resnet20", in_chans=1, num_classes=2).eval()
    pre = {"mean": [0.29], "std": [0.35], "image_size": 28, "in_chans": 1}
    ckpt.save_weights(tmp_path / "w.safetensors", model, {"classes": names, "preprocess": pre})
    e = open_eval(tmp_path / "w.safetensors", f"folder:{root}")
    assert e.data.classes == names and e.data.labels.bincount().tolist() == [6, 6]
    for new, folder in enumerate(names):
        want = sorted(int(p.stem) for p in (root / "test" / folder).glob("*.png"))
        from resnetkit.data import load_dataset
        raw = load_dataset("fashion-mnist", "test").images[want]
        got = e.data.images[e.data.labels == new]
        assert sorted(map(bytes, (x.numpy() for x in got))) == sorted(
            map(bytes, (x.numpy() for x in raw)))
    batches = calibration_set(f"folder:{root}:18", 1, preprocess=pre, classes=names)
    assert 2 <= sum(len(b) for b in batches) <= 18
