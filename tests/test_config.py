"""Every invalid field gets a ValueError that names it and what is allowed."""
import pytest

from resnetkit import ResNetConfig
from resnetkit.options import parse_override
from resnetkit.errors import UserError

BAD = [
    (dict(block="dense"), "block", "basic, bottleneck"),
    (dict(layers=()), "layers", "positive block count"),
    (dict(layers=(3, 0, 2, 2)), "layers", "positive block count"),
    (dict(widths=(64, 128)), "widths", "need 4 positive widths"),
    (dict(expansion=0), "expansion", "positive integer"),
    (dict(groups=0), "groups", ">= 1"),
    (dict(width_per_group=0), "width_per_group", ">= 1"),
    (dict(block="basic", groups=32), "groups", "basic blocks support only groups=1"),
    (dict(block="basic", width_per_group=128), "width_per_group", "basic blocks support only 64"),
    (dict(block="basic", stride_in_1x1=True), "stride_in_1x1", "bottlenecks only"),
    (dict(stem="vgg"), "stem", "imagenet, cifar, deep"),
    (dict(stem="deep", stem_width=63), "stem_width", "even"),
    (dict(maxpool_padding=2), "maxpool_padding", "choose 0 or 1"),
    (dict(stem="cifar", maxpool_padding=0), "maxpool_padding", "no padded max-pool"),
    (dict(stem="cifar_pool", maxpool_padding=0), "maxpool_padding", "no padded max-pool"),
    (dict(shortcut="D"), "shortcut", "choose A"),
    (dict(shortcut="A", avg_down=True), "avg_down", "projection shortcuts"),
    (dict(shortcut="A", widths=(64, 32, 16, 8), block="basic"), "shortcut", "cannot reduce"),
    (dict(output_stride=12), "output_stride", r"\[32, 16, 8, 4\]"),
    (dict(drop_path_rate=1.0), "drop_path_rate", r"\[0, 1\)"),
    (dict(se_ratio=-0.1), "se_ratio", r"\[0, 1\)"),
    (dict(se_divisor=0), "se_divisor", ">= 1"),
    (dict(stem_norm=False), "stem_norm", "pre-activation"),
    (dict(drop_rate=1.0), "drop_rate", r"\[0, 1\)"),
    (dict(in_chans=0), "in_chans", "from 1 to"),
    (dict(num_classes=-1), "num_classes", "from 0"),
    (dict(in_chans=4096), "in_chans", "from 1 to 1024"),
    (dict(layers=(1001, 1, 1, 1)), "layers", "at most 1000 blocks"),
    (dict(widths=(64, 128, 256, 8192)), "widths", "at most 16,384 channels"),
    (dict(groups=32, width_per_group=100000), "width_per_group", "at most 16,384"),
    (dict(stem_width=20000), "stem_width", "at most 16,384"),
    (dict(num_classes=10**7), "num_classes", "to 1,000,000"),
]


@pytest.mark.parametrize("kw,field,allowed", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_invalid_field_message(kw, field, allowed):
    with pytest.raises(ValueError, match=rf"ResNetConfig\.{field}=.*is invalid: .*{allowed}"):
        ResNetConfig(**kw)


def test_config_is_frozen_hashable_and_lists_become_tuples():
    c = ResNetConfig(layers=[2, 2, 2, 2], widths=[64, 128, 256, 512], block="basic")
    assert c.layers == (2, 2, 2, 2) and hash(c) == hash(ResNetConfig(layers=(2, 2, 2, 2), block="basic"))
    with pytest.raises(Exception):
        c.groups = 2


def test_cifar_output_stride_choices():
    assert ResNetConfig(block="basic", layers=(3, 3, 3), widths=(16, 32, 64), stem="cifar",
                        output_stride=1).output_stride == 1


@pytest.mark.parametrize("text,expected", [
    ("stride_in_1x1=true", ("stride_in_1x1", True)),
    ("layers=2,2,2,2", ("layers", (2, 2, 2, 2))),
    ("drop_path_rate=0.1", ("drop_path_rate", 0.1)),
    ("output_stride=16", ("output_stride", 16)),
    ("expansion=none", ("expansion", None)),
    ("stem=deep", ("stem", "deep")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text,msg", [("groups", "key=value"), ("nope=1", "unknown config field"),
                                      ("groups=two", "expects a int"), ("avg_down=maybe", "expects a bool")])
def test_parse_override_errors(text, msg):
    with pytest.raises(UserError, match=msg):
        parse_override(text)
