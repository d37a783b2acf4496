"""Attributions: Grad-CAM against a computation by hand, integrated gradients' completeness,
occlusion, bad input, and explain_files end to end on a tiny checkpoint."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import resnetkit as rk
from conftest import with_bn_stats
from resnetkit.errors import UserError
from resnetkit.explain import (attribute, explain_figure, explain_files, grad_cam,
                               integrated_gradients, layer_names)
from resnetkit.weights import save_weights

# one process runs this file's tests, so its module fixtures are built once (see pyproject)
pytestmark = pytest.mark.xdist_group("test_explain")

pytest.importorskip("captum")

PNG = b"\x89PNG\r\n\x1a\n"
PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.25, 0.25], "image_size": 32, "resize": 36,
       "interpolation": "bilinear", "in_chans": 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets are tiny: a second thread gains nothing, and on a busy machine its
    spin-waiting made this file five times slower (52 s against 9 s, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def with_stats(m, seed=0):
    """`m` in eval mode with non-trivial BN statistics, so that maps and heatmaps vary."""
    return with_bn_stats(m, seed)


def cifar_net(seed=1):
    """A tiny CIFAR ResNet-20, the same whatever ran before (its own seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, num_classes=10)
    return with_stats(m, seed)


def reference_cam(model, x, layer, target=None):
    """Grad-CAM written out with hooks, no Captum: (upsampled (N, H, W), the layer's map)."""
    store = {}

    def keep(module, inputs, output):
        store["maps"] = output
        output.register_hook(lambda g: store.__setitem__("grads", g))

    handle = model.get_submodule(layer).register_forward_hook(keep)
    try:
        xin = x.clone().requires_grad_(True)
        logits = model(xin)
        t = logits.argmax(1) if target is None else torch.full((len(x),), target)
        score = logits.gather(1, t[:, None]).sum()
        torch.autograd.grad(score, xin)  # fires the hook on the maps; fills no .grad
    finally:
        handle.remove()
    maps, grads = store["maps"].detach(), store["grads"]
    weights = grads.mean((2, 3), keepdim=True)  # alpha_k^c: the spatial mean of the gradient
    cam = F.relu((weights * maps).sum(1, keepdim=True))
    return F.interpolate(cam, x.shape[-2:], mode="bilinear", align_corners=False)[:, 0], cam


@pytest.fixture(scope="module")
def net():
    return cifar_net()


@pytest.fixture(scope="module")
def batch():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("layer,target", [(None, None), (None, 7), ("layer2.1", None),
                                          ("layer3.0", 2), ("layer1", None)])
def test_grad_cam_equals_hooks(net, batch, layer, target):
    got = grad_cam(net, batch, target=target, layer=layer)
    want, _ = reference_cam(net, batch, layer or "layer3", target)
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    assert want.abs().max() > 1e-4  # a heatmap worth comparing
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_grad_cam_targets_per_image_and_no_side_effects(net, batch):
    per_image = grad_cam(net, batch, target=torch.tensor([1, 4, 9]))
    for i, t in enumerate((1, 4, 9)):
        torch.testing.assert_close(per_image[i], reference_cam(net, batch[i:i + 1], "layer3",
                                                               t)[0][0], atol=1e-5, rtol=1e-4)
    frozen = cifar_net()
    frozen.layer1.requires_grad_(False)
    before = {n: p.requires_grad for n, p in frozen.named_parameters()}
    frozen.train()
    grad_cam(frozen, batch, target=[0, 1, 2])
    assert not frozen.training
    assert {n: p.requires_grad for n, p in frozen.named_parameters()} == before
    assert all(p.grad is None for p in frozen.parameters())
    assert not batch.requires_grad


def test_default_layer_is_the_last_stage(batch):
    r18 = with_stats(rk.create_model("resnet18", widths=(4, 4, 8, 8), stem_width=4,
                                     num_classes=5))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    want, maps = reference_cam(r18, x, "layer4")
    assert maps.shape[-2:] == (2, 2)  # 64 / 32
    torch.testing.assert_close(grad_cam(r18, x), want, atol=1e-5, rtol=1e-4)
    other, _ = reference_cam(r18, x, "layer3")
    assert (grad_cam(r18, x) - other).abs().max() > 1e-3
    cifar = cifar_net()
    want, maps = reference_cam(cifar, batch, "layer3")
    assert maps.shape[-2:] == (8, 8)  # 32 / 4
    torch.testing.assert_close(grad_cam(cifar, batch), want, atol=1e-5, rtol=1e-4)
    assert layer_names(cifar)[:4] == ["layer1", "layer1.0", "layer1.1", "layer1.2"]


def test_integrated_gradients_completeness_and_occlusion(net, batch):
    x = batch[:2]
    raw = integrated_gradients(net, x, target=3)
    assert raw.shape == x.shape
    with torch.no_grad():
        gap = net(x)[:, 3] - net(torch.zeros_like(x))[:, 3]
    assert gap.abs().min() > 1  # a difference worth comparing with
    torch.testing.assert_close(raw.sum((1, 2, 3)), gap, rtol=0.03, atol=1e-3)
    heat = attribute(net, x, "integrated-gradients", target=3)
    torch.testing.assert_close(heat, raw.abs().sum(1))
    x = torch.randn(1, 3, 20, 24)  # not square: the window follows each side
    occ = attribute(net, x, "occlusion", target=3)
    assert occ.shape == (1, 20, 24) and occ.abs().max() > 0


@pytest.mark.parametrize("call,words", [
    (lambda m, x: grad_cam(m, x, layer="layer9"), ["unknown layer", "layer3.2", "layer1"]),
    (lambda m, x: grad_cam(m, x, layer="fc"), ["unknown layer", "layer2.0"]),
    (lambda m, x: grad_cam(m, x, target=10), ["out of range", "10 classes"]),
    (lambda m, x: attribute(m, x, "occlusion", target=[0, 1, -1]), ["out of range"]),
    (lambda m, x: grad_cam(m, x, target=[1, 2]), ["2 targets", "3 images"]),
    (lambda m, x: grad_cam(m, x, target=1.5), ["class number"]),
    (lambda m, x: attribute(m, x, "saliency"), ["unknown attribution method", "gradcam",
                                               "integrated-gradients", "occlusion"]),
    (lambda m, x: attribute(m, x, "occlusion", layer="layer2"), ["gradcam only"]),
    (lambda m, x: grad_cam(object(), x), ["resnetkit ResNet", "gradients"]),
    (lambda m, x: attribute(torch.nn.ReLU(), x, "integrated-gradients"), ["resnetkit ResNet"]),
    (lambda m, x: grad_cam(rk.create_model("resnet20", features_only=True), x),
     ["no classifier"]),
    (lambda m, x: grad_cam(m, x[0]), ["(N, C, H, W)", "shape (3, 32, 32)"]),
    (lambda m, x: grad_cam(m, (x * 255).to(torch.uint8)), ["float batch", "uint8"]),
    (lambda m, x: grad_cam(m, x.numpy()), ["float batch", "ndarray"]),
    (lambda m, x: grad_cam(m, x[:, :1]), ["3 input channels", "got 1"]),
    (lambda m, x: grad_cam(m, x[:0]), ["empty batch"]),
])
def test_bad_input(net, batch, call, words):
    with pytest.raises(UserError) as e:
        call(net, batch)
    for w in words:
        assert w in str(e.value)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    m = cifar_net()
    names = ["cat", "dog", "\x1b[2J$\\frac{1}{0}$", "ship"] + [f"c{i}" for i in range(6)]
    save_weights(folder / "tiny.safetensors", m, {"classes": names, "preprocess": PRE})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(folder / "b.png")
    return folder


def test_explain_files_writes_the_figure(checkpoint, tmp_path):
    from resnetkit.infer.predict import predict
    imgs = [checkpoint / "a.png", checkpoint / "b.png"]
    out = tmp_path / "x.png"
    r = explain_files(checkpoint / "tiny.safetensors", imgs, out)
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    assert r["method"] == "gradcam" and r["layer"] == "layer3" and r["output"] == str(out)
    # the same preprocessing as predict: the same classes and probabilities
    want = predict(checkpoint / "tiny.safetensors", imgs, top_k=3)
    for got, ref in zip(r["images"], want):
        assert got["file"] == ref["file"]
        assert [c["class"] for c in got["top"]] == [c["class"] for c in ref["top"]]
        np.testing.assert_allclose([c["prob"] for c in got["top"]],
                                   [c["prob"] for c in ref["top"]], rtol=1e-5)
        assert got["target"]["index"] == ref["top"][0]["index"]
    # every name shown in the figure, the hostile one (ESC, mathtext) included
    r = explain_files(checkpoint / "tiny.safetensors", imgs, out, method="occlusion",
                      target=2, top_k=10)
    assert r["layer"] is None and r["images"][0]["target"]["class"].startswith("\x1b[2J")
    assert len(r["images"][1]["top"]) == 10
    assert out.read_bytes()[:8] == PNG
    assert not [p for p in tmp_path.iterdir() if p.name != "x.png"]  # no temporary left


def test_explain_files_refuses(checkpoint, tmp_path):
    ckpt, img, out = checkpoint / "tiny.safetensors", checkpoint / "a.png", tmp_path / "o.png"
    cases = [
        (lambda: explain_files(tmp_path / "model.onnx", [img], out), "no gradients"),
        (lambda: explain_files(tmp_path / "model.xml", [img], out), "exported from"),
        (lambda: explain_files(ckpt, [img], tmp_path / "o.jpg"), ".png"),
        (lambda: explain_files(ckpt, [img], tmp_path / "none" / "o.png"), "does not exist"),
        (lambda: explain_files(ckpt, [tmp_path], out), "folder"),
        (lambda: explain_files(ckpt, [tmp_path / "missing.png"], out), "missing.png"),
        (lambda: explain_files(ckpt, [img], out, method="lime"), "unknown attribution"),
        (lambda: explain_files(ckpt, [img], out, layer="layer7"), "layer3.2"),
        (lambda: explain_files(ckpt, [img], out, top_k=0), "top_k"),
        (lambda: explain_files(ckpt, [], out), "no images"),
    ]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a picture")
    cases.append((lambda: explain_files(ckpt, [img, bad], out), "cannot decode"))
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.png")
        cases.append((lambda: explain_files(ckpt, [tmp_path / "fifo.png"], out), "FIFO"))
    for call, words in cases:
        with pytest.raises(UserError, match=None) as e:
            call()
        assert words in str(e.value), str(e.value)
    assert not out.exists()


def test_explain_figure_checks_and_escapes(tmp_path):
    out = tmp_path / "f.png"
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    heat = torch.rand(2, 4, 4)  # stretched over the image
    explain_figure(images, heat, [[("\x1b[2J", 0.9)], [("$\\", 0.5), ("b" * 300, 0.1)]], out,
                   titles=["\u202eevil", "x"])
    assert out.read_bytes()[:8] == PNG
    with pytest.raises(UserError, match="one heatmap"):
        explain_figure(images, heat[:1], [[], []], out)
    with pytest.raises(UserError, match="1 or 3 channels"):
        explain_figure(images.repeat(1, 2, 1, 1), heat, [[], []], out)


def test_the_explain_verb(checkpoint, tmp_path, capsys):
    from resnetkit.cli import main
    out = tmp_path / "why.png"
    assert main(["explain", str(checkpoint / "tiny.safetensors"), str(checkpoint), "-o",
                 str(out), "--layer", "layer2"]) == 0
    text = capsys.readouterr().out
    assert out.read_bytes()[:8] == PNG and "a.png" in text and "b.png" in text
    assert "\x1b" not in text and "gradcam at layer2" in text
    assert main(["explain", str(checkpoint / "tiny.safetensors"), str(checkpoint / "a.png"),
                 "-o", str(tmp_path / "t.png"), "--target", "99"]) == 2
    assert "target" in capsys.readouterr().err
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert main(["explain", str(tmp_path / "m.onnx"), str(checkpoint / "a.png"), "-o",
                 str(tmp_path / "u.png")]) == 2
    assert not (tmp_path / "t.png").exists() and not (tmp_path / "u.png").exists()
