"""Presets against REFERENCE.md section 1 and the paper's table 6."""
import re

import pytest
import torch
from torch import nn

import resnetkit as rk
from resnetkit.errors import UserError

# REFERENCE.md section 1: trainable parameters and BN channels (1000 classes, 3 channels).
REFERENCE_PARAMS = {
    "resnet18": (11_689_512, 4_800),
    "resnet34": (21_797_672, 8_512),
    "resnet50": (25_557_032, 26_560),
    "resnet101": (44_549_160, 52_672),
    "resnet152": (60_192_808, 75_712),
    "resnext50_32x4d": (25_028_904, 34_112),
    "resnext101_32x8d": (88_791_336, 101_440),
    "resnext101_64x4d": (83_455_272, 101_440),
    "wide_resnet50_2": (68_883_240, 34_112),
    "wide_resnet101_2": (126_886_696, 68_928),
}
# The paper's table 6, in millions, rounded as printed.
PAPER_CIFAR = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
               "resnet110": 1.7, "resnet1202": 19.4}


def meta_model(name, **kw):
    with torch.device("meta"):
        return rk.create_model(name, **kw)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS))
def test_param_and_bn_counts_match_reference(name):
    m = meta_model(name)
    params, bn_chs = REFERENCE_PARAMS[name]
    assert sum(p.numel() for p in m.parameters()) == params
    assert sum(b.num_features for b in m.modules() if isinstance(b, nn.BatchNorm2d)) == bn_chs
    running = sum(b.numel() for n, b in m.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert running == 2 * bn_chs


@pytest.mark.parametrize("name", sorted(PAPER_CIFAR))
def test_cifar_param_counts_match_paper(name):
    m = meta_model(name)
    millions = sum(p.numel() for p in m.parameters()) / 1e6
    digits = 1 if PAPER_CIFAR[name] >= 1 else 2
    assert round(millions, digits) == PAPER_CIFAR[name]


def test_resnet50d_adds_exactly_the_deep_stem():
    # Deep stem 3x3 3->32, 32->32, 32->64 (+2 BN of 32) replaces the 7x7 3->64 conv;
    # avg-down moves the stride to a pool and adds no parameters.
    deep = 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + 2 * 2 * 32
    expected = 25_557_032 - 7 * 7 * 3 * 64 + deep
    assert sum(p.numel() for p in meta_model("resnet50d").parameters()) == expected


def weighted_depth(model):
    """Convs and fc on the main path, counted from the modules (shortcut convs excluded)."""
    convs = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and "downsample" not in n and ".se." not in n]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return len(convs) + len(fcs)


@pytest.mark.parametrize("name", [n for n in rk.list_models() if re.fullmatch(r"resnet\d+(v2)?", n)])
def test_depth_from_structure_equals_name(name):
    m = meta_model(name)
    expected = int(re.search(r"\d+", name).group())
    assert weighted_depth(m) == expected == m.cfg.depth


def test_depth_accounting_formulas():
    assert rk.get_config("resnet34").depth == 1 + 2 * (3 + 4 + 6 + 3) + 1 == 34
    assert rk.get_config("resnet50").depth == 1 + 3 * 16 + 1 == 50
    assert rk.get_config("resnet20").depth == 1 + 2 * 9 + 1 == 20


def test_unknown_model_lists_closest_names():
    with pytest.raises(UserError, match=r"unknown model 'resnet5'.*resnet50"):
        rk.create_model("resnet5")
    with pytest.raises(ValueError, match="resnext50_32x4d"):
        rk.create_model("resnext50_32x4")


def test_unknown_override_names_the_field():
    with pytest.raises(ValueError, match="unknown config field.*strde_in_1x1"):
        rk.create_model("resnet50", strde_in_1x1=True)


def test_list_models_pattern():
    assert rk.list_models("resnext*") == ["resnext101_32x16d", "resnext101_32x4d",
                                          "resnext101_32x8d", "resnext101_64x4d",
                                          "resnext50_32x4d", "resnext50d_32x4d"]
    assert rk.list_models("seresnet*") == ["seresnet101", "seresnet152", "seresnet152d",
                                           "seresnet18", "seresnet34", "seresnet50"]
    assert {"resnet18", "resnet50", "resnet20", "resnet1202", "resnet50d", "resnet18v2",
            "resnet50v2", "wide_resnet101_2", "resnet50_v1"} <= set(rk.list_models())


def test_v1_preset_equals_override():
    assert rk.get_config("resnet50_v1") == rk.get_config("resnet50", stride_in_1x1=True)


# ---- torchvision's state_dict layout, written from the published architecture ----------

def torchvision_resnet_keys(layers, groups=1, width_per_group=64, num_classes=1000):
    """Key -> shape of torchvision.models.ResNet with Bottleneck blocks, from its definition:
    conv1 7x7 3->64; bn1; layerN.i.{conv1,bn1,conv2,bn2,conv3,bn3}; layerN.0.downsample.{0,1};
    fc. BN entries: weight, bias, running_mean, running_var, num_batches_tracked."""
    keys = {}

    def bn(prefix, c):
        keys.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,),
                     f"{prefix}.running_mean": (c,), f"{prefix}.running_var": (c,),
                     f"{prefix}.num_batches_tracked": ()})

    keys["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for stage, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        width = int(planes * width_per_group / 64) * groups
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            bn(f"{p}.bn1", width)
            keys[f"{p}.conv2.weight"] = (width, width // groups, 3, 3)
            bn(f"{p}.bn2", width)
            keys[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    keys["fc.weight"] = (num_classes, 2048)
    keys["fc.bias"] = (num_classes,)
    return keys


@pytest.mark.parametrize("name,kw", [("resnet50", {}),
                                     ("resnext50_32x4d", dict(groups=32, width_per_group=4))])
def test_state_dict_matches_torchvision_layout(name, kw):
    expected = torchvision_resnet_keys((3, 4, 6, 3), **kw)
    sd = meta_model(name).state_dict()
    assert list(sd) == list(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    # A few entries spelled out by hand from torchvision's printed model.
    assert tuple(sd["layer2.0.downsample.0.weight"].shape) == (512, 256, 1, 1)
    if name == "resnext50_32x4d":
        assert tuple(sd["layer3.0.conv2.weight"].shape) == (512, 16, 3, 3)


def test_torchvision_style_checkpoint_loads_strictly():
    src = rk.create_model("resnet18")
    dst = rk.create_model("resnet18")
    state = {k: v.clone() for k, v in src.state_dict().items()}
    dst.load_state_dict(state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
