"""The torch engine's direct oneDNN path (infer.backends.onednn): every structure it runs
equals the eager model in fp32, bf16 and int8 stay close to it, what it does not run falls
back to the PyTorch path (or is one sentence when asked for), and bad inputs are one
sentence. (Its int8 accuracy on a trained model is test_bench's `bench --check`.)"""
import copy

import numpy as np
import pytest
import torch

import resnetkit as rk
from resnetkit.errors import UserError
from resnetkit.geometry import MAX_IMAGE_SIZE
from resnetkit.infer import RunConfig, Source, open_runner
from resnetkit.infer.backends import onednn
from resnetkit.runtime import cpu_flags, has_native_bf16

from conftest import with_bn_stats

pytestmark = pytest.mark.skipif(onednn.unavailable() is not None,
                                reason=str(onednn.unavailable()))

# small nets covering each structure the path runs (stems, blocks, shortcuts, groups, dilation)
VARIANTS = {
    "basic, option B, imagenet stem": dict(name="resnet18", widths=(8, 16, 16, 16), stem_width=8),
    "bottleneck, v1 strides, groups": dict(name="resnet50", layers=(1, 2, 1, 1), widths=(8, 8, 16, 16),
                                           stem_width=16, groups=2, width_per_group=16, stride_in_1x1=True),
    "deep stem, max-pool padding 0": dict(name="resnet18", layers=(1, 1, 1, 1), widths=(8, 8, 16, 16),
                                          stem="deep", stem_width=16, maxpool_padding=0),
    "option A, CIFAR stem": dict(name="resnet20"),
    "pooled CIFAR stem, option C": dict(name="resnet20", stem="cifar_pool", shortcut="C"),
    "plain net": dict(name="plain20"),
    "dilated last stages": dict(name="resnet18", widths=(8, 8, 16, 16), stem_width=8, output_stride=8),
    "ResNet-D: deep stem, average-pooled projections": dict(
        name="resnet50d", layers=(1, 1, 2, 1), widths=(8, 8, 16, 16), stem_width=16),
}


def model(spec, **kw):
    spec = dict(spec, **kw)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same weights whatever ran before in this process
        return with_bn_stats(rk.create_model(spec.pop("name"), num_classes=7, **spec))


def rms_error(out, ref):
    return ((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def close_in_int8(out, ref):
    """8-bit maps and weights through a dozen layers of an untrained net calibrated on 16
    random images: torchao's own PT2E graph is 4-13% off in RMS on these nets (seeds 0-3), so
    within 20%, the logits' pattern kept. A wrong scale, zero point or layout is off by
    the logits' own size."""
    corr = torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1]
    return rms_error(out, ref) < 0.2 and corr > 0.98


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fp32_equals_the_eager_model(variant):
    m = model(VARIANTS[variant])
    direct = onednn.OneDnnResNet(m, "fp32")
    for shape in ((3, 3, 40, 40), (1, 3, 33, 47)):  # odd sides: every floor and padding
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = m(x)
        out = direct(x)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0), variant


# maps of 16, 32 and 64 channels (blocked layouts hold every one) and a bottleneck at 16/32
BLOCKABLE = {"option A, CIFAR stem": VARIANTS["option A, CIFAR stem"],
             "bottleneck, 16-channel blocks": dict(name="resnet50", layers=(1, 1, 1, 1),
                                                   widths=(16, 16, 32, 32), stem_width=16)}


@pytest.mark.parametrize("layout", ["nhwc", "nChw8c", "nChw16c"])
@pytest.mark.parametrize("variant", list(BLOCKABLE))
def test_every_layout_equals_the_eager_model(variant, layout):
    m = model(BLOCKABLE[variant])
    direct = onednn.OneDnnResNet(m, "fp32", layout=layout)
    x = torch.randn(3, 3, 36, 36, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
    assert torch.allclose(direct(x), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    ran = direct.layout_of(tuple(x.shape))
    assert ran in (layout, "nhwc")  # NHWC where a layer has no kernel in the layout
    if layout == "nChw16c" and "avx512f" in cpu_flags():  # oneDNN's AVX-512 kernels
        assert ran == "nChw16c"
    if layout == "nChw8c" and "avx2" in cpu_flags():
        assert ran == "nChw8c"
    if has_native_bf16("cpu") and layout != "nChw8c":  # no bf16 kernels in blocks of 8
        nhwc = onednn.OneDnnResNet(m, "bf16", layout="nhwc")(x)
        assert (onednn.OneDnnResNet(m, "bf16", layout=layout)(x) - nhwc).abs().max() < \
            0.05 * ref.abs().max()


def test_a_layer_without_a_blocked_kernel_runs_the_plan_nhwc():
    m = model(VARIANTS["basic, option B, imagenet stem"])  # 8-channel maps beside 16s
    direct = onednn.OneDnnResNet(m, "fp32", layout="nChw16c")
    x = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(x)
    assert torch.allclose(direct(x), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    assert direct.layout_of(tuple(x.shape)) == "nhwc"


def test_chunks_follow_the_cache():
    mb = 1 << 20
    # three maps of 50 KB an image (ResNet-20's 16x28x28 fp32) in half of 32 MB: 109 images
    assert onednn.chunk_for(256, 256 * 50 * 1024, 32 * mb) == 64
    assert onednn.chunk_for(256, 256 * 25 * 1024, 32 * mb) == 128  # bf16: 218 images fit
    assert onednn.chunk_for(120, 120 * 50 * 1024, 32 * mb) == 64
    assert onednn.chunk_for(100, 100 * 50 * 1024, 32 * mb) == 100  # 109 fit: whole
    assert onednn.chunk_for(64, 64 * 50 * 1024, 32 * mb) == 64  # the batch fits whole
    assert onednn.chunk_for(16, 16 * (3 << 20), 32 * mb) == 16  # 5 images would fit: too few
    assert onednn.chunk_for(256, 256 * 50 * 1024, 0) == 256  # cache size unknown
    assert onednn.chunk_for(0, 0, 32 * mb) == 0


def test_a_batch_in_chunks_equals_it_whole_and_the_eager_model(monkeypatch):
    m = model(VARIANTS["option A, CIFAR stem"])
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    whole = onednn.OneDnnResNet(m, "fp32")
    monkeypatch.setattr(onednn, "last_level_cache_bytes", lambda: 0)
    assert whole.chunk_of(tuple(x.shape)) == 20
    ref = whole(x)
    # the largest map: 16x32x32 fp32, 64 KB an image; three of them for 8 images in 3 MB / 2
    monkeypatch.setattr(onednn, "last_level_cache_bytes", lambda: 3 << 20)
    chunked = onednn.OneDnnResNet(m, "fp32")
    assert chunked.chunk_of(tuple(x.shape)) == 8  # runs of 8, 8 and 4 images
    assert torch.equal(chunked(x), ref)
    with torch.no_grad():
        eager = m(x)
    assert torch.allclose(ref, eager, atol=1e-4 * eager.abs().max().item(), rtol=0)
    assert torch.equal(chunked(x[:5]), ref[:5])  # a batch under a chunk: one run


def test_the_layout_follows_the_cpu(monkeypatch):
    import resnetkit.infer.backends.onednn as mod
    for flags, want in (({"avx2"}, "nhwc"), ({"avx2", "avx512f"}, "nChw16c"),
                        ({"avx512f", "avx512_bf16"}, "nChw16c"),
                        ({"avx512f", "avx512_bf16", "amx_bf16"}, "nChw16c")):
        monkeypatch.setattr(mod, "cpu_flags", lambda flags=flags: set(flags))
        assert mod.layout_for("fp32") == want
        assert mod.layout_for("int8") == "nhwc"
        assert mod.layout_for("bf16") == ("nhwc" if "amx_bf16" in flags else want)
    with pytest.raises(UserError, match="layout is auto, nhwc"):
        onednn.OneDnnResNet(model(VARIANTS["option A, CIFAR stem"]), "fp32", layout="NCHW")
    with pytest.raises(UserError, match="int8 runs NHWC only"):
        onednn.OneDnnResNet(model(VARIANTS["option A, CIFAR stem"]), "int8",
                            [torch.randn(4, 3, 32, 32)], layout="nChw16c")


def int8_case(variant, batch, size, seed):
    """(model, calibration batches, input, fp32 logits, direct int8 logits)."""
    m = model(VARIANTS[variant])
    gen = torch.Generator().manual_seed(seed)
    calib = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(2)]
    x = torch.randn(batch // 2, 3, size, size, generator=gen)
    with torch.no_grad():
        ref = m(x)
    try:
        return m, calib, x, ref, onednn.OneDnnResNet(m, "int8", calib)(x)
    except UserError as e:  # e.g. AVX2 has no int8 kernel for 2-channel groups
        if "no optimized" not in str(e):
            raise
        pytest.skip(f"this CPU: {e}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_int8_of_every_structure_stays_close(variant):
    *_, ref, out = int8_case(variant, 8, 36, 3)
    assert close_in_int8(out, ref), variant


def test_option_a_shortcut_is_exact_in_int8():
    """Option A's shortcut runs as a 1x1 conv of 0/1 weights: in int8 they are 127 at scale
    1/127, so every u8 value crosses it unchanged (at torchao's 1/127.5 the upper half would
    come out a step low)."""
    m = model(VARIANTS["option A, CIFAR stem"])
    graph = onednn._Graph(onednn.fold_model(copy.deepcopy(m).eval()))
    eye = next(op["weight"] for op in graph.ops if op.get("weight") is not None)
    q, scale = onednn._identity_weight(eye)
    assert q.dtype == np.int8 and set(np.unique(q)) == {0, 127}
    assert np.all(q.reshape(len(q), -1).max(1) * scale.astype(np.float64) <= 1.0)
    assert np.allclose(q.reshape(len(q), -1).max(1)[:eye.shape[1]] * scale[:eye.shape[1]], 1.0, rtol=0, atol=1e-7)


def test_int8_and_bf16_stay_close_to_fp32():
    m, calib, x, ref, int8 = int8_case("ResNet-D: deep stem, average-pooled projections", 16, 48, 2)
    assert close_in_int8(int8, ref)
    if has_native_bf16("cpu"):
        bf16 = onednn.OneDnnResNet(m, "bf16")(x)
        assert (bf16 - ref).abs().max() < 0.05 * ref.abs().max()
    pytest.importorskip("torchao")
    from resnetkit.infer.quantize import quantize_graph
    with torch.no_grad():  # the publisher's quantizer on the same images: no worse than it
        pt2e = quantize_graph(m, calib)(x)
    assert rms_error(int8, ref) <= 1.5 * rms_error(pt2e, ref) + 0.01


def test_the_default_torch_path_takes_it_and_falls_back_where_it_cannot():
    m = model(VARIANTS["option A, CIFAR stem"])
    run = open_runner(Source.of_model(m), RunConfig(engine="torch", precision="fp32"))
    assert isinstance(run.module, onednn.OneDnnResNet)
    # compile=True asks for Inductor; direct=False for PyTorch
    assert not isinstance(open_runner(Source.of_model(m), RunConfig(
        engine="torch", precision="fp32", direct=False)).module, onednn.OneDnnResNet)
    preact = with_bn_stats(rk.create_model("resnet18", block="preact_basic", stem_norm=False,
                                           widths=(8, 8, 8, 8), stem_width=8))
    assert "pre-activation" in onednn.unsupported(preact)
    run = open_runner(Source.of_model(preact), RunConfig(engine="torch", precision="fp32"))
    assert not isinstance(run.module, onednn.OneDnnResNet)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(run(x), preact(x), atol=1e-4 * preact(x).abs().max().item())
    with pytest.raises(UserError, match="does not run pre-activation blocks"):
        open_runner(Source.of_model(preact), RunConfig(engine="torch", precision="fp32",
                                                       direct=True))
    with pytest.raises(UserError, match="direct must be auto, True or False"):
        RunConfig(direct="yes")
    with pytest.raises(UserError, match="compile=True asks for PyTorch's"):  # not ignored
        open_runner(Source.of_model(m), RunConfig(engine="torch", precision="fp32",
                                                  direct=True, compile=True))
    # int8's compile=False asks for PT2E's reference graph, as it always did
    calib = [torch.randn(4, 3, 32, 32)]
    assert not isinstance(open_runner(Source.of_model(m), RunConfig(
        engine="torch", precision="int8", calibration=calib, compile=False)).module,
        onednn.OneDnnResNet)


def test_bad_inputs_are_one_sentence():
    m = model(VARIANTS["basic, option B, imagenet stem"])
    direct = onednn.OneDnnResNet(m, "fp32")
    small = model(VARIANTS["deep stem, max-pool padding 0"])  # its max-pool empties a 1x1 map
    for net, bad in ((m, torch.randn(2, 1, 32, 32)), (m, torch.randn(1, 3, 8, MAX_IMAGE_SIZE + 1)),
                     (m, torch.randn(3, 32, 32)), (small, torch.randn(1, 3, 1, 1))):
        with torch.no_grad(), pytest.raises(UserError) as eager:
            net(bad)
        with pytest.raises(UserError) as ours:  # the model's own sentence
            (direct if net is m else onednn.OneDnnResNet(small, "fp32"))(bad)
        assert str(ours.value) == str(eager.value)
    with torch.no_grad():  # an empty batch: the eager model's empty answer
        assert direct(torch.randn(0, 3, 32, 32)).shape == m(torch.randn(0, 3, 32, 32)).shape == (0, 7)
    for shape in ((3, 32, 32), (1, 3, 32, 32, 1), (1, 3, 0, 32)):
        with pytest.raises(UserError, match=r"an input shape is \(N, C, H, W\)"):
            direct.prepare(shape)
    # one native network however the module is copied: freed once, when the last copy goes
    import copy
    import gc
    import pickle
    shallow = copy.copy(direct)
    del direct
    gc.collect()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(shallow(x), m(x), atol=1e-4 * m(x).abs().max().item(), rtol=0)
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(shallow)
    with pytest.raises(UserError, match="cannot be pickled"):
        pickle.dumps(shallow)
    with pytest.raises(UserError, match="int8 needs calibration images"):
        onednn.OneDnnResNet(m, "int8")
    with pytest.raises(UserError, match="runs fp32, bf16, int8"):
        onednn.OneDnnResNet(m, "fp16")
    huge = model(VARIANTS["option A, CIFAR stem"])
    with torch.no_grad():
        huge.fc.weight.fill_(float("inf"))
    with pytest.raises(UserError, match="produced NaN or infinite"):
        onednn.OneDnnResNet(huge, "int8", [torch.randn(4, 3, 32, 32)])


def test_plans_per_shape_are_kept_up_to_the_limit(monkeypatch):
    m = model(VARIANTS["option A, CIFAR stem"])
    direct = onednn.OneDnnResNet(m, "fp32")
    monkeypatch.setattr(onednn, "MAX_PLANS", 2)
    for n in (1, 2, 3, 1):  # the first plan is dropped by the third shape, then rebuilt
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            ref = m(x)
        assert torch.allclose(direct(x), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    threads = torch.get_num_threads()
    assert list(direct._native.plans) == [(3, 3, 32, 32, threads), (1, 3, 32, 32, threads)]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    for _ in range(2):  # the same plan again: the same numbers
        assert torch.allclose(direct(x), ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
    assert list(direct._native.plans)[-1] == (3, 3, 32, 32, threads)  # used last: kept longest


def test_without_the_library_it_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn, "_dirs", lambda: (tmp_path / "include", tmp_path / "lib"))
    assert "pip install 'resnetkit[onednn]'" in onednn.unavailable()
    m = model(VARIANTS["option A, CIFAR stem"])
    run = open_runner(Source.of_model(m), RunConfig(engine="torch", precision="fp32"))
    assert not isinstance(run.module, onednn.OneDnnResNet)


def test_a_damaged_or_unwritable_cache_still_builds(monkeypatch, tmp_path):
    """The library is cached beside the weights; a cached file that does not load is built
    again (in a fresh process: this one has the library mapped already), and a cache folder
    that cannot be written builds into a temporary one."""
    import os
    import subprocess
    import sys
    cache = tmp_path / "cache"
    env = dict(os.environ, RESNETKIT_CACHE=str(cache / "weights"))
    load = [sys.executable, "-c", "from resnetkit.infer.backends import onednn; onednn.library()"]
    subprocess.run(load, env=env, check=True, timeout=300)
    built = list(cache.glob("onednn_resnet-*.so"))
    assert len(built) == 1 and not list(cache.glob(".onednn_resnet-*"))  # no temporary left
    damaged = tmp_path / "damaged"
    damaged.write_bytes(b"not a library")
    os.replace(damaged, built[0])
    subprocess.run(load, env=env, check=True, timeout=300)
    assert built[0].read_bytes()[:4] == b"\x7fELF"
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a cache "folder" under a file cannot be made
    monkeypatch.setenv("RESNETKIT_CACHE", str(blocked / "weights"))
    onednn.library.cache_clear()
    try:
        m = model(VARIANTS["option A, CIFAR stem"])
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = m(x)
        out = onednn.OneDnnResNet(m, "fp32")(x)
        assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item())
    finally:
        onednn.library.cache_clear()


def test_a_cpu_without_a_kernel_for_a_layer_gets_the_pytorch_path(monkeypatch):
    """The plan built when the model is opened finds a layer oneDNN has no optimized kernel
    for (on some CPU): "auto" then runs PyTorch, direct=True says which layer."""
    def no_kernel(self, shape):
        raise UserError("the direct oneDNN path cannot run inputs of shape [1, 3, 32, 32]: "
                        "oneDNN has no optimized int8 convolution for a 3x3 conv of 3 to 16 "
                        "channels on this CPU")
    monkeypatch.setattr(onednn.OneDnnResNet, "prepare", no_kernel)
    m = model(VARIANTS["option A, CIFAR stem"])
    run = open_runner(Source.of_model(m), RunConfig(engine="torch", precision="fp32"))
    assert not isinstance(run.module, onednn.OneDnnResNet)
    with pytest.raises(UserError, match="no optimized int8 convolution for a 3x3 conv"):
        open_runner(Source.of_model(m), RunConfig(engine="torch", precision="fp32", direct=True))
