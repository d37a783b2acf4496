"""timm's model API and numerics, written from timm's documented behaviour (no timm import):
forward_intermediates, FeatureInfo, the classifier API, grad checkpointing, timm's SE width,
the dilated avg-down pool, resnetv2 names; and models that script, fx-trace and export."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resnetkit as rk
from resnetkit.errors import UserError
from resnetkit.weights.sources import load_into, resolve_data_config
from resnetkit.zoo import is_model

X64 = torch.randn(2, 3, 64, 64)


def randomise_norms(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.GroupNorm)):
            n = mod.weight.shape[0]
            mod.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return m


# ResNet-50 at 64x64: the stem halves (32), the max-pool halves (16), stages 2-4 halve each.
R50_SHAPES = [(64, 32), (256, 16), (512, 8), (1024, 4), (2048, 2)]


def test_forward_intermediates_int_list_stop_early_and_formats():
    m = rk.create_model("resnet50").eval()
    with torch.no_grad():
        final, feats = m.forward_intermediates(X64, indices=2)
        assert isinstance(final, torch.Tensor) and isinstance(feats, list)
        assert [(f.shape[1], f.shape[-1]) for f in feats] == R50_SHAPES[3:]
        assert torch.equal(final, m.forward_features(X64))
        _, feats = m.forward_intermediates(X64, indices=[0, -1])
        assert [(f.shape[1], f.shape[-1]) for f in feats] == [R50_SHAPES[0], R50_SHAPES[4]]
        _, feats = m.forward_intermediates(X64)  # None: every level
        assert [(f.shape[1], f.shape[-1]) for f in feats] == R50_SHAPES
        final, feats = m.forward_intermediates(X64, indices=[1], stop_early=True)
        assert final.shape == (2, 256, 16, 16) and torch.equal(final, feats[0])
        only = m.forward_intermediates(X64, indices=3, intermediates_only=True)
        assert isinstance(only, list) and len(only) == 3
    with pytest.raises(UserError, match="NCHW"):
        m.forward_intermediates(X64, output_fmt="NHWC")
    with pytest.raises(UserError, match="out of range"):
        m.forward_intermediates(X64, indices=[5])
    with pytest.raises(UserError, match="last 6"):
        m.forward_intermediates(X64, indices=6)


def test_preact_norm_applies_to_the_last_level_only_when_asked():
    m = randomise_norms(rk.create_model("resnetv2_50")).eval()
    with torch.no_grad():
        final, (raw,) = m.forward_intermediates(X64, indices=1)
        _, (normed,) = m.forward_intermediates(X64, indices=1, norm=True)
        assert torch.allclose(normed, F.relu(m.norm(raw)))
        assert torch.equal(final, normed) and not torch.allclose(raw, normed)


def test_feature_info_methods():
    m = rk.create_model("resnet50")
    fi = m.feature_info
    assert fi.channels() == [64, 256, 512, 1024, 2048]
    assert fi.reduction() == [2, 4, 8, 16, 32]
    assert fi.module_name() == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert fi.channels(2) == 512 and fi.reduction([1, 3]) == [4, 16]
    assert fi.get_dicts(keys=["num_chs"])[:2] == [{"num_chs": 64}, {"num_chs": 256}]
    assert fi[4]["module"] == "layer4" and len(fi) == 5
    f = rk.create_model("resnet50", features_only=True, out_indices=(1, 3))
    assert f.feature_info.channels() == [256, 1024] and len(f.feature_info) == 5
    assert f.feature_info.from_other((0,)).channels() == [64]
    c = rk.create_model("resnet20", features_only=True)
    assert c.feature_info.reduction() == [1, 1, 2, 4]  # the CIFAR stem keeps the size


def test_classifier_api_and_global_pools():
    m = rk.create_model("resnet18").eval()
    assert m.get_classifier() is m.fc and m.get_classifier(name_only=True) == "fc"
    with torch.no_grad():
        fmap = m.forward_features(X64)
        m.reset_classifier(0, "")
        assert m(X64).shape == (2, 512, 2, 2) and torch.equal(m(X64), fmap)
        m.reset_classifier(0, "max")
        assert torch.equal(m(X64), fmap.flatten(2).max(-1).values)
        m.reset_classifier(0, "avgmax")
        assert torch.allclose(m(X64), (fmap.flatten(2).max(-1).values + fmap.flatten(2).mean(-1)) / 2)
        m.reset_classifier(5, "catavgmax")
        assert m.fc.in_features == 1024 and m(X64).shape == (2, 5)
    assert m.global_pool is m.avgpool
    with pytest.raises(UserError, match="num_classes=0"):
        m.reset_classifier(10, "")
    with pytest.raises(UserError, match="global_pool"):
        rk.create_model("resnet18", global_pool="median")
    g = rk.create_model("resnet18", global_pool="max", num_classes=3).eval()
    with torch.no_grad():
        assert torch.allclose(g(X64), g.fc(g.forward_features(X64).amax((2, 3))))


def test_drop_rate_is_dropout_before_the_fc():
    m = rk.create_model("resnet18", drop_rate=0.5, num_classes=4)
    f = torch.randn(8, 512, 2, 2)
    m.train()
    pooled = m.forward_head(f, pre_logits=True)
    zero_share = (pooled == 0).float().mean().item()
    assert 0.3 < zero_share < 0.7  # half the features dropped (p=0.5, 4096 draws)
    m.eval()
    assert torch.equal(m.forward_head(f, pre_logits=True), f.mean((2, 3)))


def test_grad_checkpointing_gives_the_same_gradients_and_statistics():
    def step(checkpointing):
        torch.manual_seed(0)
        m = rk.create_model("resnet18", drop_path_rate=0.2, num_classes=5)
        m.set_grad_checkpointing(checkpointing)
        m.train()
        torch.manual_seed(1)
        loss = m(X64).square().mean()
        loss.backward()
        grads = [p.grad.clone() for p in m.parameters()]
        stats = [b.clone() for n, b in m.named_buffers() if "running" in n]
        return grads, stats
    g0, s0 = step(False)
    g1, s1 = step(True)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * a.abs().max().item())
    assert all(torch.equal(a, b) for a, b in zip(s0, s1))  # BN stats updated once, not twice


def test_pretrained_cfg_data_config_and_is_model():
    m = rk.create_model("resnet50")
    assert m.pretrained_cfg is m.default_cfg
    assert m.pretrained_cfg["input_size"] == (3, 224, 224)
    assert m.pretrained_cfg["first_conv"] == "conv1" and m.pretrained_cfg["classifier"] == "fc"
    dc = resolve_data_config(m)
    # timm's ImageNet defaults: 224 crop of a 256 resize, bilinear, ImageNet statistics
    assert dc["crop_pct"] == 0.875 and dc["interpolation"] == "bilinear"
    assert dc["mean"] == (0.485, 0.456, 0.406) and dc["std"] == (0.229, 0.224, 0.225)
    assert rk.create_model("resnet50d").pretrained_cfg["first_conv"] == "conv1.0"
    assert rk.create_model("resnet20").pretrained_cfg["input_size"] == (3, 32, 32)
    assert is_model("seresnet50") and not is_model("vit_base_patch16_224")
    with pytest.raises(UserError, match="one of the two"):
        resolve_data_config()


def test_data_config_of_a_checkpoint(tmp_path):
    from resnetkit.weights.checkpoint import save_weights
    m = rk.create_model("resnet20", in_chans=1)
    pre = {"mean": [0.286], "std": [0.353], "image_size": 28, "in_chans": 1}
    save_weights(tmp_path / "w.safetensors", m, {"classes": [str(i) for i in range(10)],
                                                 "preprocess": pre})
    dc = resolve_data_config(source=tmp_path / "w.safetensors")
    assert dc["input_size"] == (1, 28, 28) and dc["crop_pct"] == 1.0 and dc["mean"] == (0.286,)


# timm's SE width: make_divisible(channels / 16, 8) = max(8, int(v + 4) // 8 * 8), by hand:
# 64 -> 4 -> 8; 128 -> 8; 256 -> 16; 512 -> 32; 1024 -> 64; 2048 -> 128.
@pytest.mark.parametrize("name,widths", [("seresnet18", [8, 8, 16, 32]),
                                         ("seresnet50", [16, 32, 64, 128])])
def test_se_width_is_rounded_as_timm(name, widths):
    m = rk.create_model(name)
    assert [getattr(m, f"layer{i}")[0].se.fc1.out_channels for i in (1, 2, 3, 4)] == widths
    exact = rk.create_model(name, se_divisor=1)
    assert exact.layer1[0].se.fc1.out_channels == (4 if name == "seresnet18" else 16)


def test_dilated_avg_down_pools_2x2_same_padded():
    m = randomise_norms(rk.create_model("resnet50d", output_stride=16)).eval()
    ds = m.layer4[0].downsample
    x = torch.randn(1, 1024, 5, 6)
    # timm's AvgPool2dSame(2, stride 1): one zero row and column appended (bottom, right),
    # then each output is the mean of a 2x2 window, the zeros counted
    xp = torch.zeros(1, 1024, 6, 7)
    xp[..., :5, :6] = x
    want = (xp[..., :-1, :-1] + xp[..., :-1, 1:] + xp[..., 1:, :-1] + xp[..., 1:, 1:]) / 4
    assert torch.allclose(ds[0](x), want, atol=1e-6)
    assert isinstance(m.layer3[0].downsample[0], nn.AvgPool2d)  # an undilated stage strides
    assert m.feature_info.reduction() == [2, 4, 8, 16, 16]


# timm state_dicts written out from timm's module structure (timm/models/resnet.py and
# resnetv2.py): name -> shape. BN layers carry weight, bias, running_mean, running_var and
# num_batches_tracked; GroupNorm weight and bias.
def _bn(name, c, gn=False):
    keys = {f"{name}.weight": (c,), f"{name}.bias": (c,)}
    if not gn:
        keys.update({f"{name}.running_mean": (c,), f"{name}.running_var": (c,),
                     f"{name}.num_batches_tracked": ()})
    return keys


def timm_resnet(layers, bottleneck, deep=False, avg_down=False, se=False, gn=False,
                groups=1, base_width=64, classes=1000):
    sd = {}
    if deep:  # stem_width 32: conv 3->32 /2, BN, conv 32->32, BN, conv 32->64
        sd.update({"conv1.0.weight": (32, 3, 3, 3), **_bn("conv1.1", 32, gn),
                   "conv1.3.weight": (32, 32, 3, 3), **_bn("conv1.4", 32, gn),
                   "conv1.6.weight": (64, 32, 3, 3)})
    else:
        sd["conv1.weight"] = (64, 3, 7, 7)
    sd.update(_bn("bn1", 64, gn))
    inplanes, exp = 64, (4 if bottleneck else 1)
    for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            out = planes * exp
            if bottleneck:
                w = int(planes * (base_width / 64.0)) * groups
                sd.update({f"{p}.conv1.weight": (w, inplanes, 1, 1), **_bn(f"{p}.bn1", w, gn),
                           f"{p}.conv2.weight": (w, w // groups, 3, 3), **_bn(f"{p}.bn2", w, gn),
                           f"{p}.conv3.weight": (out, w, 1, 1), **_bn(f"{p}.bn3", out, gn)})
            else:
                sd.update({f"{p}.conv1.weight": (planes, inplanes, 3, 3), **_bn(f"{p}.bn1", planes, gn),
                           f"{p}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{p}.bn2", planes, gn)})
            if se:
                rd = max(8, int(out / 16 + 4) // 8 * 8)
                sd.update({f"{p}.se.fc1.weight": (rd, out, 1, 1), f"{p}.se.fc1.bias": (rd,),
                           f"{p}.se.fc2.weight": (out, rd, 1, 1), f"{p}.se.fc2.bias": (out,)})
            if j == 0 and (i > 0 or inplanes != out):
                k = 1 if avg_down else 0  # downsample_avg: pool, conv, norm
                sd.update({f"{p}.downsample.{k}.weight": (out, inplanes, 1, 1),
                           **_bn(f"{p}.downsample.{k + 1}", out, gn)})
            inplanes = out
    sd.update({"fc.weight": (classes, inplanes), "fc.bias": (classes,)})
    return sd


def timm_resnetv2(layers, bottleneck, deep=False, classes=1000):
    sd = ({"stem.conv1.weight": (32, 3, 3, 3), **_bn("stem.norm1", 32),
           "stem.conv2.weight": (32, 32, 3, 3), **_bn("stem.norm2", 32),
           "stem.conv3.weight": (64, 32, 3, 3)} if deep else {"stem.conv.weight": (64, 3, 7, 7)})
    prev = 64
    for i, (n, c) in enumerate(zip(layers, (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512))):
        for j in range(n):
            p = f"stages.{i}.blocks.{j}"
            mid = c // 4 if bottleneck else c
            sd.update(_bn(f"{p}.norm1", prev))
            if bottleneck:
                sd.update({f"{p}.conv1.weight": (mid, prev, 1, 1), **_bn(f"{p}.norm2", mid),
                           f"{p}.conv2.weight": (mid, mid, 3, 3), **_bn(f"{p}.norm3", mid),
                           f"{p}.conv3.weight": (c, mid, 1, 1)})
            else:
                sd.update({f"{p}.conv1.weight": (mid, prev, 3, 3), **_bn(f"{p}.norm2", mid),
                           f"{p}.conv2.weight": (c, mid, 3, 3)})
            if j == 0 and (i > 0 or prev != c):
                sd[f"{p}.downsample.conv.weight"] = (c, prev, 1, 1)
            prev = c
    sd.update({**_bn("norm", prev), "head.fc.weight": (classes, prev, 1, 1), "head.fc.bias": (classes,)})
    return sd


TIMM = {
    "resnet18": timm_resnet((2, 2, 2, 2), False),
    "resnet50": timm_resnet((3, 4, 6, 3), True),
    "resnet26": timm_resnet((2, 2, 2, 2), True),
    "resnet18d": timm_resnet((2, 2, 2, 2), False, deep=True, avg_down=True),
    "resnet26d": timm_resnet((2, 2, 2, 2), True, deep=True, avg_down=True),
    "resnet50d": timm_resnet((3, 4, 6, 3), True, deep=True, avg_down=True),
    "resnet50c": timm_resnet((3, 4, 6, 3), True, deep=True),
    "seresnet18": timm_resnet((2, 2, 2, 2), False, se=True),
    "seresnet50": timm_resnet((3, 4, 6, 3), True, se=True),
    "resnet50_gn": timm_resnet((3, 4, 6, 3), True, gn=True),
    "resnext50_32x4d": timm_resnet((3, 4, 6, 3), True, groups=32, base_width=4),
    "seresnext26d_32x4d": timm_resnet((2, 2, 2, 2), True, deep=True, avg_down=True, se=True,
                                      groups=32, base_width=4),
    "resnetv2_18": timm_resnetv2((2, 2, 2, 2), False),
    "resnetv2_50": timm_resnetv2((3, 4, 6, 3), True),
    "resnetv2_50d": timm_resnetv2((3, 4, 6, 3), True, deep=True),
}


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_state_dict_loads_strictly(name):
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randint(0, 9, s) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
             for k, s in TIMM[name].items()}
    m = rk.create_model(name)
    load_into(m, dict(state), f"timm {name}")  # raises unless every name and shape fits
    own = m.state_dict()
    if name.startswith("resnetv2"):  # renamed: spot-check that tensors land where they belong
        deep = name.endswith("d")
        pairs = {"stages.1.blocks.0.norm3.weight": "layer2.0.bn3.weight",
                 "stages.1.blocks.0.downsample.conv.weight": f"layer2.0.downsample.{int(deep)}.weight",
                 "norm.running_var": "norm.running_var",
                 ("stem.conv3.weight" if deep else "stem.conv.weight"):
                     ("conv1.6.weight" if deep else "conv1.weight")}
        if name == "resnetv2_18":
            pairs = {"stages.2.blocks.1.norm2.bias": "layer3.1.bn2.bias", "stem.conv.weight": "conv1.weight"}
        for theirs, ours in pairs.items():
            assert torch.equal(own[ours], state[theirs]), (theirs, ours)
        assert torch.equal(own["fc.weight"], state["head.fc.weight"].flatten(1))
    else:  # timm's names are ours
        assert all(torch.equal(own[k], v) for k, v in state.items())


def test_resnetv2_has_a_bare_conv_stem():
    m = rk.create_model("resnetv2_50")
    assert isinstance(m.bn1, nn.Identity) and isinstance(m.relu, nn.Identity)
    assert m.feature_info.module_name(0) == "conv1"
    assert isinstance(rk.create_model("resnet50v2").bn1, nn.BatchNorm2d)  # He et al.'s stem
    with pytest.raises(UserError, match="stem_norm"):
        rk.create_model("resnet50", stem_norm=False)


def test_norm_layer_choices():
    frozen = rk.create_model("resnet18", norm_layer="frozen_batchnorm")
    plain = rk.create_model("resnet18")
    assert set(frozen.state_dict()) == set(plain.state_dict())  # plain-BN checkpoints load
    frozen.load_state_dict(plain.state_dict())
    n_bn = sum(p.numel() for n, p in plain.named_parameters() if ".bn" in n or n.startswith("bn")
               or "downsample.1" in n)
    n_all = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n_all(plain) - n_all(frozen) == n_bn  # norms hold buffers only
    # torchvision's FrozenBatchNorm2d has no num_batches_tracked: its state_dicts load too
    tv_state = {k: v for k, v in plain.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen.load_state_dict(tv_state)
    from resnetkit.layers import FrozenBatchNorm2d
    as_class = rk.create_model("resnet18", norm_layer=FrozenBatchNorm2d)  # torchvision's way
    assert as_class.cfg.norm_layer == "frozen_batchnorm"
    with pytest.raises(UserError, match="LayerNorm is not available"):
        rk.create_model("resnet18", norm_layer=nn.LayerNorm)
    gn = rk.create_model("resnet50_gn")
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in gn.modules()) == 53
    with pytest.raises(UserError, match="norm_layer.*divisible by 32"):
        rk.create_model("resnet20", norm_layer="groupnorm")
    with pytest.raises(UserError, match="norm_layer"):
        rk.create_model("resnet18", norm_layer="layernorm")


# Every family, in few models (exports take seconds each), one block per stage: basic with
# drop path; v1 bottleneck; SE-ResNeXt with the deep stem, avg-down and dilation (the same-
# padded pool) and frozen BN; both pre-activation forms; CIFAR with option A; GroupNorm.
FAMILIES = {
    "basic_drop_path": ("resnet18", {"drop_path_rate": 0.1}),
    "bottleneck_v1": ("resnet50_v1", {}),
    "seresnext_d_dilated_frozen": ("seresnext26d_32x4d", {"output_stride": 16,
                                                          "norm_layer": "frozen_batchnorm"}),
    "preact_basic": ("resnet18v2", {}),
    "resnetv2": ("resnetv2_50", {}),
    "cifar_option_a": ("resnet20", {}),
    "groupnorm_wide": ("resnet50_gn", {"width_per_group": 128}),
}


# three of the seven run with -m slow only, to keep the suite within its time
SLOW_FAMILIES = {"bottleneck_v1", "preact_basic", "groupnorm_wide"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in SLOW_FAMILIES
                                    else f for f in sorted(FAMILIES)])
def test_script_fx_and_export_match_eager(family):
    name, kw = FAMILIES[family]
    n_stages = 3 if name == "resnet20" else 4
    m = randomise_norms(rk.create_model(name, layers=(1,) * n_stages, **kw)).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        ref = m(x)
        scripted = torch.jit.script(m)
        traced = torch.fx.symbolic_trace(m)
        exported = torch.export.export(m, (x,)).module()
        for other in (scripted, traced, exported):
            assert torch.allclose(other(x), ref, atol=1e-5, rtol=0)
        y = torch.randn(1, 3, 33, 57)  # script and fx hold no sizes
        assert torch.allclose(scripted(y), m(y), atol=1e-5) and torch.allclose(traced(y), m(y), atol=1e-5)
        feats = torch.jit.script(rk.create_model(name, layers=(1,) * n_stages, features_only=True,
                                                 **kw).eval())
        assert len(feats(x)) == n_stages + 1
    with pytest.raises(UserError, match="input channels"):  # eager users keep the clear error
        m(torch.randn(1, 1, 48, 48))


def test_compile_fullgraph():
    m = rk.create_model("resnet20", layers=(1, 1, 1)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.compile(m, fullgraph=True, backend="eager")(x), m(x), atol=1e-5)


def test_hubconf_has_an_entry_per_preset():
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("hubconf", root / "hubconf.py")
    hub = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hub)
    # what torch.hub.list reports: public callables of the module
    entries = {f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_")}
    assert entries == set(rk.PRESETS)
    m = torch.hub.load(str(root), "resnet20", source="local", num_classes=7)
    assert isinstance(m, rk.ResNet) and m.num_classes == 7
    assert math.isclose(sum(p.numel() for p in m.parameters()),
                        sum(p.numel() for p in rk.create_model("resnet20", num_classes=7).parameters()))
