"""The fused BN + residual sum + ReLU kernels of the training step (fused.py): against an
independent float64 computation, thread-count independence, the blocks' use of them, the
trainer's choice, and an exact resume with them."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnetkit
from resnetkit import fused
from resnetkit.errors import UserError
from resnetkit.runtime.compiling import cxx
from resnetkit.runtime.fused_kernels import decide_fused, library
from resnetkit.train import Trainer, TrainStep

pytestmark = pytest.mark.skipif(cxx() is None, reason="the fused kernels need a C++ compiler")
CL = torch.channels_last


def reference(x, res, weight, bias, eps, relu, dy):
    """y = relu(bn(x) + res) and its gradients, in float64 from the same inputs, by autograd
    through plain tensor ops (the batch's biased variance normalises; the running variance
    takes the unbiased one)."""
    x64 = x.detach().double().requires_grad_()
    r64 = None if res is None else res.detach().double().requires_grad_()
    w64, b64 = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    mean = x64.mean((0, 2, 3), keepdim=True)
    var = x64.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (x64 - mean) / torch.sqrt(var + eps) * w64.view(1, -1, 1, 1) + b64.view(1, -1, 1, 1)
    if r64 is not None:
        y = y + r64
    if relu:
        y = torch.relu(y)
    y.backward(dy.double())
    n = x.numel() // x.shape[1]
    return dict(y=y.detach(), dx=x64.grad, dres=None if r64 is None else r64.grad,
                dw=w64.grad, db=b64.grad, mean=mean.flatten(),
                var_unbiased=var.flatten() * n / (n - 1))


def fused_run(x, res, bn, relu, dy):
    x = x.detach().clone().requires_grad_()
    r = None if res is None else res.detach().clone().requires_grad_()
    with fused.fused_norm_act(library()):
        y = fused.norm_act(bn, x, r, relu)
    y.backward(dy)  # outside the context: the backward is the function's recorded one
    return dict(y=y.detach(), dx=x.grad, dres=None if r is None else r.grad,
                dw=bn.weight.grad, db=bn.bias.grad)


def batch(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 2).to(dtype).contiguous(memory_format=CL)
    res = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=CL)
    dy = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=CL)
    bn = nn.BatchNorm2d(shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-0.5, 0.5, generator=g)
    return x, res, dy, bn


def close(a, b, rel):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-12


# rows M = N*H*W: fewer than one chunk of the kernels' reduction, several chunks with a
# ragged end; channel counts that fill no vector exactly
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (9, 17, 13, 11), (4, 64, 4, 4)])
@pytest.mark.parametrize("with_res", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_fp32_matches_float64(shape, with_res, relu):
    x, res, dy, bn = batch(shape, torch.float32)
    res = res if with_res else None
    got = fused_run(x, res, bn, relu, dy)
    ref = reference(x, res, bn.weight, bn.bias, bn.eps, relu, dy)
    for k in ("y", "dx", "dw", "db") + (("dres",) if with_res else ()):
        assert close(got[k], ref[k], 2e-5), k
    assert close(bn.running_mean, 0.9 * torch.zeros(shape[1]) + 0.1 * ref["mean"], 1e-5)
    assert close(bn.running_var, 0.9 * torch.ones(shape[1]) + 0.1 * ref["var_unbiased"], 1e-5)
    assert int(bn.num_batches_tracked) == 1


def test_bf16_rounds_once_and_its_gradients_follow():
    # bf16 maps: y is the exact value rounded once (within half a bf16 step, 2^-9 relative);
    # gradients against float64 given the same ReLU mask, within bf16's own precision
    x, res, dy, bn = batch((8, 16, 9, 9), torch.bfloat16)
    got = fused_run(x, res, bn, True, dy)
    ref = reference(x, res, bn.weight, bn.bias, bn.eps, False, dy)
    exact = torch.relu(ref["y"])
    assert ((got["y"].double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-30).all()
    mask = got["y"] > 0
    ref = reference(x, res, bn.weight, bn.bias, bn.eps, False, dy.double() * mask)
    for k in ("dx", "dres", "dw", "db"):
        assert close(got[k], ref[k], 2e-2), k


def test_results_do_not_depend_on_the_thread_count():
    x, res, dy, _ = batch((16, 24, 14, 14), torch.bfloat16)
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            _, _, _, bn = batch((16, 24, 14, 14), torch.bfloat16)
            runs.append(fused_run(x, res, bn, True, dy) | {"rv": bn.running_var.clone()})
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def test_what_the_kernels_do_not_take_runs_the_modules_own_ops():
    x, res, dy, bn = batch((4, 8, 6, 6), torch.float32)
    nchw = x.contiguous()
    assert fused.usable(bn, x, res)
    assert not fused.usable(bn, nchw)  # another layout
    assert not fused.usable(bn, x, res.contiguous())
    assert not fused.usable(bn, x.double())
    assert not fused.usable(bn.eval(), x)  # evaluation: the running statistics
    assert not fused.usable(nn.GroupNorm(2, 8), x)
    bn.train()
    ref = torch.relu(F.batch_norm(nchw, None, None, bn.weight, bn.bias, True) + res)
    with fused.fused_norm_act(library()):
        assert torch.allclose(fused.norm_act(bn, nchw, res), ref, atol=1e-5)
    assert torch.allclose(fused.norm_act(bn, x, res), ref, atol=1e-5)  # outside: not fused


def spy(monkeypatch):
    calls = []
    for fn in (fused._BNAct, fused._BNActPool):
        monkeypatch.setattr(fn, "apply", lambda *a, real=fn.apply: calls.append(a[0].shape) or
                            real(*a))
    return calls


def test_blocks_use_the_kernels_only_inside_the_context(monkeypatch):
    # every BN goes through them: ResNet-20's stem (BN, ReLU and max-pool in one) and 9
    # blocks x 2 (option A shortcuts, no BN), ResNet-26's stem, 8 bottlenecks x 3 and 4 projections; the step's gradients are as
    # close to a float64 run's as the modules' own fp32 ones are (a batch of 4 makes BN's
    # backward amplify rounding: both sides are some 1e-4 off, so they are compared with
    # the exact gradients, not with each other)
    calls = spy(monkeypatch)
    for name, kw, n_bn in (("resnet20", {"in_chans": 1, "stem": "cifar_pool"}, 19),
                           ("resnet26", {"widths": (8, 8, 8, 8), "stem_width": 8}, 29)):
        torch.manual_seed(0)
        a = resnetkit.create_model(name, num_classes=10, **kw).to(memory_format=CL).train()
        b = resnetkit.create_model(name, num_classes=10, **kw).to(memory_format=CL).train()
        exact = resnetkit.create_model(name, num_classes=10, **kw).double().train()
        b.load_state_dict(a.state_dict())
        exact.load_state_dict(a.state_dict())
        x = torch.randn(4, a.cfg.in_chans, 32, 32).contiguous(memory_format=CL)
        y = torch.randint(0, 10, (4,))
        F.cross_entropy(exact(x.double()), y).backward()
        F.cross_entropy(a(x), y).backward()
        assert calls == []  # outside the context: the modules as they are
        with fused.fused_norm_act(library()):
            F.cross_entropy(b(x), y).backward()
        assert len(calls) == n_bn
        calls.clear()
        for (k, p), q, e in zip(a.named_parameters(), b.parameters(), exact.parameters()):
            aten_err = float((p.grad.double() - e.grad).abs().max())
            fused_err = float((q.grad.double() - e.grad).abs().max())
            assert fused_err <= 4 * aten_err + 1e-6 * float(e.grad.abs().max()), k
        for (k, s), t, e in zip(a.state_dict().items(), b.state_dict().values(),
                                exact.state_dict().values()):  # running statistics
            aten_err = float((s.double() - e.double()).abs().max())
            fused_err = float((t.double() - e.double()).abs().max())
            assert fused_err <= 4 * aten_err + 1e-6 * float(e.double().abs().max()), k


def test_the_trainer_decides_and_records(tiny_config, monkeypatch):
    assert decide_fused("auto", "cpu", True, False)[0]
    assert decide_fused("auto", "cpu", False, False) == (False, "not channels_last")
    assert not decide_fused("auto", "cpu", True, True)[0]
    assert decide_fused(False, "cpu", True, False) == (False, "asked for")
    with pytest.raises(UserError, match="fused_bn=true cannot run here: not channels_last"):
        decide_fused(True, "cpu", False, False)
    with pytest.raises(UserError, match="fused_bn must be auto, true or false"):
        decide_fused("yes", "cpu", True, False)
    with pytest.raises(UserError, match="fused_bn"):
        tiny_config(fused_bn="sometimes")
    with pytest.raises(ValueError, match="compiled step"):
        TrainStep(nn.Linear(1, 1), nn.Linear(1, 1), None, None, torch.device("cpu"), "fp32",
                  compile=True, fused=True)
    calls = spy(monkeypatch)
    t = Trainer(tiny_config("on", channels_last=True, epochs=1), quiet=True)
    assert t.fused and t.describe()["fused_bn"] is True
    # compile "auto" gives way to them: the fused eager step measured faster than compiling
    assert not t.compiled and t.compile_why.startswith("the fused BN kernels")
    t.fit()
    assert calls  # the step ran them
    config = json.loads((t.run_dir / "config.json").read_text())
    assert config["train"]["fused_bn"] is True and config["resolved"]["fused_bn"] is True
    off = Trainer(tiny_config("off", channels_last=False, epochs=1), quiet=True)
    assert not off.fused and off.fused_why == "not channels_last"


def test_a_fused_run_resumes_bitwise_exactly(tiny_config):
    full = Trainer(tiny_config("full", channels_last=True, compile=False), quiet=True)
    full.fit()
    part = Trainer(tiny_config("part", channels_last=True, compile=False), quiet=True)
    part.fit(until_epoch=1)
    resumed = Trainer.resume(part.run_dir, quiet=True)
    assert resumed.fused and resumed.epoch == 1
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hw", [(8, 6), (7, 5)])  # odd sides: floor mode drops the last row
def test_the_2x2_max_pool_equals_atens(dtype, hw):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, *hw, generator=g).to(dtype)
    x[0, 0, :2, :2] = 1.0  # a tie: the first maximum in row order takes the gradient
    x[1, 1, 2, 2] = float("nan")  # NaN wins its window, forward and backward
    x = x.contiguous(memory_format=CL)
    dy = torch.randn(3, 5, hw[0] // 2, hw[1] // 2, generator=g).to(dtype)
    pool = nn.MaxPool2d(2, 2)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = pool(a)
    with fused.fused_norm_act(library()):
        yb = fused.pool(pool, b)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())
    assert torch.equal(a.grad, b.grad)
    assert yb.is_contiguous(memory_format=CL)
    with fused.fused_norm_act(library()):  # other pools: the module's own
        assert fused.pool(nn.MaxPool2d(3, 2, 1), b).shape == (3, 5, (hw[0] + 1) // 2, (hw[1] + 1) // 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [16, 6])  # 16 lanes at a time, and one at a time
def test_the_stem_bn_relu_and_pool_in_one_kernel(dtype, c):
    # against the same kernels run one after the other (BN + ReLU, then the max-pool, each
    # checked against ATen above): the same output and running statistics bit for bit (the
    # same values compared, ties and NaN included), the gradients within rounding (summed over
    # the pooled maps only, in another order)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, c, 10, 12, generator=g) * 2 + 1).to(dtype)
    x[0, 0, :2, :2] = 3.0  # a tie
    x = x.contiguous(memory_format=CL)
    dp = torch.randn(4, c, 5, 6, generator=g).to(dtype).contiguous(memory_format=CL)
    pool, out, grads, stats = nn.MaxPool2d(2), [], [], []
    for together in (False, True):
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(c)
        nn.init.uniform_(bn.weight, 0.5, 1.5), nn.init.uniform_(bn.bias, -0.5, 0.5)
        xi = x.clone().requires_grad_()
        with fused.fused_norm_act(library()):
            y = fused.norm_act_pool(bn, xi, pool) if together else \
                fused.pool(pool, fused.norm_act(bn, xi))
        y.backward(dp)
        out.append(y)
        grads.append((xi.grad, bn.weight.grad, bn.bias.grad))
        stats.append((bn.running_mean, bn.running_var, bn.num_batches_tracked))
    assert out[1].is_contiguous(memory_format=CL) and out[1].dtype == dtype
    assert torch.equal(out[0], out[1])
    assert all(torch.equal(a, b) for a, b in zip(*stats))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for a, b in zip(*grads):
        assert close(b, a, tol)


def test_the_stem_kernel_falls_back_where_it_does_not_apply(monkeypatch):
    calls = []
    for fn in (fused._BNAct, fused._BNActPool):
        monkeypatch.setattr(fn, "apply", lambda *a, fn=fn, real=fn.apply: calls.append(fn) or
                            real(*a))
    bn, x = nn.BatchNorm2d(4), torch.randn(2, 4, 7, 8).contiguous(memory_format=CL)
    even = x[:, :, :6].contiguous(memory_format=CL)
    with fused.fused_norm_act(library()):
        odd = fused.norm_act_pool(bn, x, nn.MaxPool2d(2))  # an odd side
        other = fused.norm_act_pool(bn, even, nn.MaxPool2d(3, 2, 1))  # another pool
        both = fused.norm_act_pool(bn, even, nn.MaxPool2d(2))
    assert odd.shape == (2, 4, 3, 4) and other.shape == (2, 4, 3, 4) and both.shape == (2, 4, 3, 4)
    assert calls == [fused._BNAct, fused._BNAct, fused._BNActPool]
    bn.eval()
    assert torch.equal(fused.norm_act_pool(bn, x, nn.MaxPool2d(2)),
                       nn.MaxPool2d(2)(torch.relu(bn(x))))  # outside the context: the modules


def test_checkpointed_stages_recompute_with_the_same_kernels():
    # activation checkpointing recomputes each block in the backward pass, outside the
    # step's context: it runs the forward's kernels again, and the gradients agree
    torch.manual_seed(0)
    a = resnetkit.create_model("resnet20", in_chans=1, num_classes=10).to(memory_format=CL)
    b = resnetkit.create_model("resnet20", in_chans=1, num_classes=10).to(memory_format=CL)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(4, 1, 16, 16).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (4,))
    for m in (a, b):
        with fused.fused_norm_act(library()):
            loss = F.cross_entropy(m(x), y)
        loss.backward()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), k
    assert all(torch.equal(s, t) for s, t in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_cap_below_avx512_builds_the_kernels_without_it(monkeypatch):
    # ONEDNN_MAX_CPU_ISA=AVX2 (the capped runs standing in for an AVX2-only CPU) hides
    # AVX-512 from oneDNN; the kernels are then built without it too, under their own key
    import resnetkit.runtime.fused_kernels as fk
    seen = []

    def fake(source, flags, key=""):
        seen.append((flags, key))
        raise OSError("not built here")

    monkeypatch.setattr(fk, "load_native", fake)
    monkeypatch.setattr(fk, "cpu_flags", lambda: {"avx2", "fma"})
    fk.library.cache_clear()
    try:
        with pytest.raises(UserError, match="could not be built"):
            fk.library()
        monkeypatch.setattr(fk, "cpu_flags", lambda: {"avx2", "fma", "avx512f"})
        fk.library.cache_clear()
        with pytest.raises(UserError):
            fk.library()
    finally:
        fk.library.cache_clear()
    assert "-mno-avx512f" in seen[0][0] and "-mno-avx512f" not in seen[1][0]
    assert seen[0][1] != seen[1][1]


@pytest.mark.parametrize("flags", [["-mno-avx512f"], ["-mno-avx"]])
def test_the_kernels_built_for_narrower_vectors_agree_with_aten(flags):
    # the kernels' lanes follow the build's registers (16 floats with AVX-512, 8 with AVX2,
    # 4 with SSE): each width, forward and backward of BN + sum + ReLU and the one-kernel stem,
    # equals ATen's modules within rounding
    import resnetkit.runtime.fused_kernels as fk
    from resnetkit.runtime.native import load_native
    from resnetkit.runtime import cpu_flags
    if "avx2" not in cpu_flags():
        pytest.skip("the flags are x86's")
    lib = fk.typed(load_native(fk.SOURCE, ["-O2", "-march=native", "-fopenmp", *flags],
                               key="test-" + "".join(flags)))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 24, 6, 8, generator=g).contiguous(memory_format=CL)
    r = torch.randn(4, 24, 6, 8, generator=g).contiguous(memory_format=CL)
    dy = torch.randn(4, 24, 6, 8, generator=g)
    out = []
    for use in (None, lib):
        torch.manual_seed(0)
        bn = nn.BatchNorm2d(24)
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        with fused.fused_norm_act(use):
            y = fused.norm_act(bn, xi, ri)
            p = fused.norm_act_pool(bn, xi, nn.MaxPool2d(2))
        (y * dy).sum().backward()
        p.sum().backward()
        out.append((y, p, xi.grad, ri.grad, bn.weight.grad, bn.bias.grad, bn.running_var))
    for a, b in zip(*out):
        assert close(b, a, 1e-5)
