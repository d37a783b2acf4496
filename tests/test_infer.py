"""BN folding, the optimised inference path, export checked in ONNX Runtime, bad input."""
import copy
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import resnetkit as rk
from conftest import with_bn_stats
from resnetkit.cli import main
from resnetkit.errors import UserError
from resnetkit.infer.backends.onnxruntime import session as onnx_session
from resnetkit.infer.export import export
from resnetkit.infer.optimize import compile_pays, fold_bn, fold_model, optimize
from resnetkit.runtime import has_native_bf16


def trained_like(name, **kw):
    """A model whose BN layers hold non-trivial statistics and affine parameters."""
    return with_bn_stats(rk.create_model(name, **kw))


def test_fold_bn_single_pair_by_hand():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.fill_(0.5)
    bn.running_var.fill_(4.0)
    bn.weight.data.fill_(2.0)
    bn.bias.data.fill_(1.0)
    fused = fold_bn(conv, bn)
    # y = (conv - 0.5) * 2 / sqrt(4 + eps) + 1
    s = 2.0 / (4.0 + bn.eps) ** 0.5
    assert torch.allclose(fused.weight, conv.weight * s)
    assert torch.allclose(fused.bias, torch.full((4,), -0.5 * s + 1.0))


@pytest.mark.parametrize("name,kw", [("resnet18", {}), ("resnet50d", {}), ("resnet20", {}),
                                     ("resnext50_32x4d", {"se_ratio": 0.0625}), ("resnet18v2", {})])
def test_folded_model_equals_original(name, kw):
    m = trained_like(name, **kw)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        folded = fold_model(copy.deepcopy(m))
        out = folded(x)
    n_bn = sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in folded.modules())
    if m.cfg.preact:  # only the stem BN folds; every pre-activation BN stays
        assert n_bn == sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules()) - 1
    else:
        assert n_bn == 0
    # fp32 reassociation only: 1e-4 of the logit scale
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


def test_fold_requires_eval():
    with pytest.raises(UserError, match="eval mode"):
        fold_model(rk.create_model("resnet18").train())


def test_optimize_bf16_and_fp32():
    # eager: the compiled graphs' equality with eager is the next test's
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same weights whatever ran before
        m = trained_like("resnet50")
    x = torch.randn(8, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(x)
        fp32 = optimize(m, precision="fp32", channels_last=True, compile=False, direct=False)(x)
        bf16 = optimize(m, precision="bf16", compile=False, direct=False)(x)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert torch.allclose(fp32, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    # bf16 keeps 8 bits of mantissa: bounds on the logits' error. (The first class is not
    # compared here: random weights put the first classes of every image within bf16's
    # rounding of each other; test_bench's `bench --check` compares the classes of a trained
    # model on the test set.)
    err = (bf16 - ref).abs()
    assert err.max() < 0.1 * ref.abs().max() and err.mean() < 0.02 * ref.abs().mean()
    # bf16 weights stored once instead of cast by autocast on each call: the same rounding
    auto = optimize(m, precision="bf16", bf16_weights=False, compile=False, direct=False)
    stored = optimize(m, precision="bf16", bf16_weights=True, compile=False)
    assert stored.bf16_weights and not auto.bf16_weights
    assert stored.model.fc.weight.dtype == torch.float32
    assert {p.dtype for n, p in stored.model.named_parameters() if not n.startswith("fc.")} == {torch.bfloat16}
    with torch.no_grad():
        a, b = auto(x), stored(x)
    assert torch.allclose(a, b, atol=1e-2 * ref.abs().max().item(), rtol=0)
    assert all(p.requires_grad for p in m.parameters())  # the original is untouched
    with pytest.raises(UserError, match="precision"):
        optimize(m, precision="fp16")


def test_optimize_compiled_equals_eager_and_auto_follows_the_hardware():
    m = trained_like("resnet20", num_classes=10)
    x = torch.randn(3, 3, 32, 32)
    eager = optimize(m, precision="fp32", compile=False, direct=False)
    comp = optimize(m, precision="fp32", compile=True)
    assert comp.compiled and not eager.compiled
    with torch.no_grad():
        ref, a, b = m(x), eager(x), comp(x)
    # fp32: inductor may reorder reductions, nothing more
    assert torch.allclose(b, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    assert torch.allclose(a, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    assert comp.frozen  # compiled on the CPU: weights frozen, one graph per input shape
    comp.MAX_SHAPES = 2
    with torch.no_grad():
        for n in (3, 5, 6):  # the third shape is past the limit: eager, the same numbers
            xn = torch.randn(n, 3, 32, 32)
            r = m(xn)
            assert torch.allclose(comp(xn), r, atol=1e-4 * r.abs().max().item(), rtol=0)
    assert comp._shapes == {(3, 3, 32, 32), (5, 3, 32, 32)}
    import shutil
    has_cxx = any(shutil.which(c) for c in ("g++", "clang++", "c++"))
    assert compile_pays(torch.device("cpu")) == has_cxx
    assert optimize(m, direct=False).compiled == has_cxx and not optimize(m, compile=False).compiled
    with pytest.raises(UserError, match="compile must be"):
        optimize(m, compile="yes")


def test_openvino_runs_the_exported_file_like_pytorch(tmp_path):
    pytest.importorskip("openvino")
    from resnetkit.infer.backends.openvino import compiled, precisions, read

    def openvino_model(path, precision="fp32", shape=None):
        return compiled(read(path), precision, shape=shape)
    m = trained_like("resnet18", num_classes=10)
    path = export(m, tmp_path / "r18.onnx", "onnx", image_size=64)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
    assert "fp32" in precisions()
    for shape in (None, (3, 3, 64, 64)):  # dynamic batch, then a fixed shape
        out = torch.from_numpy(np.array(openvino_model(path, "fp32", shape=shape)(x.numpy())))
        assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    if "bf16" in precisions():
        out = torch.from_numpy(np.array(openvino_model(path, "bf16")(x.numpy())))
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(UserError, match="fp32 or bf16"):
        openvino_model(path, "fp16")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load"):
        openvino_model(bad)


def test_onnx_export_matches_pytorch_in_onnxruntime(tmp_path):
    m = trained_like("resnet18", num_classes=10)
    path = export(m, tmp_path / "r18.onnx", "onnx", image_size=64)
    sess = onnx_session(path)
    for batch in (1, 3):  # dynamic batch
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            ref = m(x).numpy()
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == (batch, 10)
        assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("fmt", ["torchscript", "exported-program"])
def test_torch_formats_roundtrip(tmp_path, fmt):
    m = trained_like("resnet20")
    path = export(m, tmp_path / f"m.{fmt}", fmt, image_size=32)
    x = torch.randn(3, 3, 32, 32)
    loaded = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    with torch.no_grad():
        assert torch.allclose(loaded(x), m(x), atol=1e-4)


def test_export_bad_input(tmp_path):
    m = rk.create_model("resnet18", maxpool_padding=0).eval()
    with pytest.raises(UserError, match="folder .* does not exist"):
        export(m, tmp_path / "missing" / "x.onnx")
    with pytest.raises(UserError, match="too small"):
        export(m, tmp_path / "x.onnx", image_size=3)
    with pytest.raises(UserError, match="unknown export format"):
        export(m, tmp_path / "x.tflite", "tflite")


def test_onnx_with_nhwc_layout_is_refused(tmp_path):
    node = helper.make_node("Identity", ["input"], ["out"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 28, 28, 1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 28, 28, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "nhwc.onnx")
    with pytest.raises(UserError, match="expects NCHW"):
        onnx_session(tmp_path / "nhwc.onnx")


def test_cli_export_preset(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    assert main(["export", "resnet20", "in_chans=1", "--image-size", "28", "-o", str(out)]) == 0
    assert out.exists() and "dynamic batch" in capsys.readouterr().out
    assert main(["export", "resnet20", "-o", str(tmp_path / "no" / "x.onnx")]) == 2


def onednn_calls(fast, x, capfd) -> tuple[torch.Tensor, list[str]]:
    """The output of one call and the kinds of oneDNN primitives it ran, from oneDNN's log."""
    with torch.no_grad():
        fast(x), fast(x)  # compiled on the first call
        capfd.readouterr()
        with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            out = fast(x)
    return out, [line.split(",")[5] for line in capfd.readouterr().out.splitlines()
                 if line.startswith("onednn_verbose") and ",exec," in line]


@pytest.mark.skipif(not compile_pays(torch.device("cpu")), reason="needs a C++ compiler")
@pytest.mark.skipif(not has_native_bf16("cpu"),
                    reason="oneDNN's bf16 convolutions need a CPU with native bf16 (AVX512-BF16 or AMX)")
def test_compiled_cpu_path_prepacks_the_weights(capfd):
    """The eager bf16 path reorders every conv weight into oneDNN's blocked layout on each
    call; the compiled (frozen) path did that once, at compile time. With torch.compile's
    graph limit lowered to 1, a second compiled model still compiles: each InferenceModel
    has a cache of its own."""
    import torch._dynamo.config as dynamo_config
    x = torch.randn(4, 3, 32, 32)
    m1, m2 = trained_like("resnet20", num_classes=10), trained_like("resnet20", num_classes=10)
    convs = sum(isinstance(mod, torch.nn.Conv2d) for mod in m1.modules())
    with dynamo_config.patch(recompile_limit=1):
        for m, compiled in ((m1, False), (m1, True), (m2, True)):
            out, calls = onednn_calls(optimize(m, precision="bf16", compile=compiled, direct=False), x, capfd)
            with torch.no_grad():
                ref = m(x)
            assert torch.equal(out.argmax(1), ref.argmax(1))
            assert (out - ref).abs().max() < 0.05 * ref.abs().max()
            assert calls.count("convolution") == convs
            if compiled:
                assert calls.count("reorder") == 0
            else:
                assert calls.count("reorder") >= convs


def test_preset_onnx_takes_any_size_and_carries_imagenet_preprocessing(tmp_path):
    from PIL import Image
    from resnetkit.infer.export import export_source
    from resnetkit.infer.predict import predict
    from resnetkit.infer.source import open_source
    path, model, size = export_source("resnet18", ["layers=1,1,1,1"], "onnx", tmp_path / "r.onnx")
    assert size == 224
    sess = onnx_session(path)
    assert sess.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    for hw in ((224, 224), (160, 160), (96, 130)):
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {"input": x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), hw
    meta = open_source(path).meta
    # torchvision's ImageNet eval transform: resize 256, centre crop 224, ImageNet statistics
    assert meta.preprocess["image_size"] == 224 and meta.preprocess["resize"] == 256
    assert meta.preprocess["mean"] == [0.485, 0.456, 0.406] and len(meta.classes) == 1000
    Image.new("RGB", (300, 240), (200, 30, 30)).save(tmp_path / "red.png")
    out = predict(path, [tmp_path / "red.png"], top_k=3)
    assert len(out) == 1 and len(out[0]["top"]) == 3


def test_onnx_fixed_size_and_opset(tmp_path):
    import onnx
    m = trained_like("resnet20", num_classes=10)
    fixed = export(m, tmp_path / "f.onnx", image_size=32, dynamic_size=False)
    assert onnx_session(fixed).get_inputs()[0].shape == ["batch", 3, 32, 32]
    top = onnx.defs.onnx_opset_version()
    p = export(m, tmp_path / "o.onnx", image_size=32, opset=20)
    assert [o.version for o in onnx.load(p).opset_import if o.domain in ("", "ai.onnx")] == [20]
    for bad in (13, top + 1):
        with pytest.raises(UserError, match=f"opset {bad} is not available"):
            export(m, tmp_path / "b.onnx", image_size=32, opset=bad)
    assert not (tmp_path / "b.onnx").exists()
    with pytest.raises(UserError, match="applies to ONNX"):
        export(m, tmp_path / "b.pt", "torchscript", image_size=32, opset=20)


# ---- hostile input: FIFOs named like images, weights that overflow -------------------------

TINY_PRE = {"mean": [0.29], "std": [0.35], "image_size": 28, "in_chans": 1}


@pytest.fixture
def own_rng():
    """The global RNG as it was before the test (loading a checkpoint draws from it)."""
    with torch.random.fork_rng():
        yield


def tiny_checkpoint(path, scale=1.0):
    """A 3-class resnet20 (widths 4, 8, 8) for 28x28 gray images; scale multiplies every
    weight: at 1e6 they stay finite (so loading accepts them) but the outputs overflow."""
    from resnetkit.weights import checkpoint as ckpt
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = rk.create_model("resnet20", widths=(4, 8, 8), stem_width=4, in_chans=1,
                            num_classes=3).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    ckpt.save_weights(path, m, {"classes": ["Bag", "T-shirt/top", "Sneaker"],
                                "preprocess": TINY_PRE})
    return path


def test_predict_reads_only_regular_files(tmp_path, capsys, own_rng):
    import os

    from PIL import Image
    from resnetkit.infer import predict
    w = tiny_checkpoint(tmp_path / "w.safetensors")
    (tmp_path / "imgs").mkdir()
    Image.new("L", (28, 28), 200).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "sub.png").mkdir()  # a folder named like an image is walked
    assert len(predict(w, [tmp_path / "imgs"])) == 1
    os.mkfifo(tmp_path / "imgs" / "x.png")
    for given in (tmp_path / "imgs" / "x.png", tmp_path / "imgs"):
        with pytest.raises(UserError, match=r"x\.png is a FIFO, not a regular image file"):
            predict(w, [given])
        assert main(["predict", str(w), str(given)]) == 2
        err = capsys.readouterr().err
        assert "x.png is a FIFO" in err and err.count("\n") == 1


def test_outputs_that_overflow_are_refused_by_predict_and_eval(tmp_path, capsys, own_rng):
    from PIL import Image
    from resnetkit.evaluate import evaluate_checkpoint
    from resnetkit.infer import predict
    from resnetkit.infer import evaluate_source
    w = tiny_checkpoint(tmp_path / "huge.safetensors", 1e6)
    Image.new("L", (28, 28), 200).save(tmp_path / "a.png")
    unusable = "produced NaN or infinite outputs on {}; its weights are unusable"
    with pytest.raises(UserError, match=unusable.format(".*a.png")):
        predict(w, [tmp_path / "a.png"])
    with pytest.raises(UserError, match=unusable.format("image 0 of fashion-mnist test")):
        evaluate_checkpoint(w, limit=64)
    with pytest.raises(UserError, match=unusable.format("image 0 of fashion-mnist test")):
        evaluate_source(w, engine="onnxruntime", precision="fp32")
    assert main(["eval", str(w)]) == 2
    err = capsys.readouterr().err
    assert "huge.safetensors produced NaN or infinite outputs" in err and err.count("\n") == 1
    # a checkpoint whose weights are fine passes the same check
    ok = tiny_checkpoint(tmp_path / "ok.safetensors")
    assert predict(ok, [tmp_path / "a.png"])[0]["top"][0]["prob"] > 0


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_predict_opens_the_checkpoint_once(tmp_path):
    """`resnetkit predict CKPT image.png` opens the .safetensors file once, as the kernel
    sees it (every openat of the process and its threads)."""
    from PIL import Image
    ckpt = tiny_checkpoint(tmp_path / "m.safetensors")
    Image.new("L", (28, 28), 128).save(tmp_path / "x.png")
    log = tmp_path / "trace"
    cli = [sys.executable, "-m", "resnetkit", "predict", str(ckpt), str(tmp_path / "x.png")]
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=openat", "-o", str(log), *cli],
                       capture_output=True, text=True, timeout=300)
    if r.returncode and "ptrace" in r.stderr:
        pytest.skip("ptrace is not permitted here")
    assert r.returncode == 0, r.stderr
    assert "Bag" in r.stdout or "Sneaker" in r.stdout or "T-shirt" in r.stdout
    opens = [line for line in log.read_text().splitlines() if str(ckpt) in line]
    assert len(opens) == 1, opens
