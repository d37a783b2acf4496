"""Model behaviour: shapes, stride placement, pooling variants, equivalences, errors."""
import pytest
import torch
from torch import nn

import resnetkit as rk
from resnetkit.errors import UserError

IMAGENET = [n for n in rk.list_models() if rk.PRESETS[n].stem != "cifar"]
CIFAR = [n for n in rk.list_models() if rk.PRESETS[n].stem == "cifar"]


def conv_out(size, k, s, p):
    return (size - k + 2 * p) // s + 1


@pytest.mark.parametrize("name", IMAGENET)
@pytest.mark.parametrize("hw", [(224, 224), (512, 512), (200, 320)])
def test_output_shapes_imagenet_presets(name, hw):
    # Shapes only: the meta device runs every op's shape logic without the arithmetic.
    with torch.device("meta"):
        m = rk.create_model(name)
        feats = m.forward_features(torch.empty(2, 3, *hw))
        logits = m.forward_head(feats)
    h, w = hw
    for _ in range(2):  # conv1 (7x7 s2 p3) and max-pool (3x3 s2 p1)
        h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
    for _ in range(3):  # three stride-2 stages
        h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)
    assert feats.shape == (2, m.num_features, h, w)
    assert logits.shape == (2, 1000)


@pytest.mark.parametrize("name", CIFAR[:4])
def test_cifar_presets_at_32(name):
    m = rk.create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    assert m.forward_features(x).shape == (2, 64, 8, 8)
    assert m(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "resnet50v2"])
def test_one_channel_input(name):
    m = rk.create_model(name, in_chans=1, num_classes=10).eval()
    assert m.conv1.weight.shape[1] == 1
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def strides_of(model, stage):
    b = getattr(model, stage)[0]
    return b.conv1.stride[0], b.conv2.stride[0], b.conv3.stride[0]


def test_v1_and_v15_differ_only_in_stride_placement():
    v15, v1 = rk.create_model("resnet50"), rk.create_model("resnet50", stride_in_1x1=True)
    for stage in ("layer2", "layer3", "layer4"):
        assert strides_of(v15, stage) == (1, 2, 1)
        assert strides_of(v1, stage) == (2, 1, 1)
        assert getattr(v1, stage)[0].downsample[0].stride == (2, 2)
    assert strides_of(v15, "layer1") == strides_of(v1, "layer1") == (1, 1, 1)
    # Everything else is the same: the same parameter shapes, and all other convs stride 1.
    assert {k: v.shape for k, v in v1.state_dict().items()} == \
        {k: v.shape for k, v in v15.state_dict().items()}
    x = torch.randn(1, 3, 64, 64)
    assert v1.eval()(x).shape == v15.eval()(x).shape


def stage_sizes(model, size):
    return [f.shape[-1] for f in model.eval()(torch.randn(1, 3, size, size))]


def test_maxpool_padding_variants_seed_sizes():
    # REFERENCE.md section 6: padding 0 gives 112 -> 55 -> 28 at 224, 256 -> 127 -> 64 at 512.
    p0 = rk.create_model("resnet50", maxpool_padding=0, features_only=True)
    p1 = rk.create_model("resnet50", features_only=True)
    assert stage_sizes(p0, 224) == [112, 55, 28, 14, 7]
    assert stage_sizes(p1, 224) == [112, 56, 28, 14, 7]
    assert stage_sizes(p0, 512) == [256, 127, 64, 32, 16]
    assert stage_sizes(p1, 512) == [256, 128, 64, 32, 16]


def test_channels_last_matches_nchw():
    m = rk.create_model("resnet50").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = m(x)
        out = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    # fp32 convs reorder their sums in the NHWC kernels; 1e-4 relative to the logit scale.
    assert torch.allclose(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "resnet20", "resnet18v2"])
def test_trace_and_export_match_eager(name):
    m = rk.create_model(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = m(x)
        traced = torch.jit.trace(m, x)
        batch = torch.export.Dim("batch", min=1, max=64)
        ep = torch.export.export(m, (x,), dynamic_shapes={"x": {0: batch}})
        x3 = torch.randn(3, 3, 64, 64)
        assert torch.allclose(traced(x), ref, atol=1e-5)
        assert torch.allclose(ep.module()(x), ref, atol=1e-5)
        assert torch.allclose(ep.module()(x3), m(x3), atol=1e-5)


@pytest.mark.parametrize("name,kw", [("resnet18", {}), ("resnet20", {}), ("resnet50d", {}),
                                     ("resnet18v2", {}), ("resnet50v2", {}),
                                     ("resnext50_32x4d", dict(se_ratio=0.0625, shortcut="C"))])
def test_gradients_reach_every_parameter(name, kw):
    m = rk.create_model(name, **kw).train()
    m(torch.randn(2, 3, 64, 64)).logsumexp(1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20"])
def test_zero_init_zeroes_last_bn_of_every_branch(name):
    m = rk.create_model(name, zero_init_residual=True).eval()
    blocks = m.blocks()
    last = [b.bn3 if hasattr(b, "bn3") else b.bn2 for b in blocks]
    assert len(last) == sum(m.cfg.layers)
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in last)
    # so every block starts as its shortcut: block(x) == relu(shortcut(x))
    x = torch.randn(1, blocks[0].conv1.in_channels, 16, 16).relu()
    with torch.no_grad():
        assert torch.allclose(blocks[0](x), torch.relu(blocks[0].downsample(x)))
    plain = rk.create_model(name)
    assert all(torch.all(b.bn2.weight == 1) for b in plain.blocks())


def test_zero_init_preact_zeroes_last_conv():
    m = rk.create_model("resnet50v2", zero_init_residual=True)
    assert all(torch.count_nonzero(b.conv3.weight) == 0 for b in m.blocks())


def test_option_a_shortcut_is_parameter_free_and_pads_zeros():
    m = rk.create_model("resnet20")
    sc = m.layer2[0].downsample
    assert sum(p.numel() for p in sc.parameters()) == 0
    x = torch.randn(1, 16, 32, 32)
    y = sc(x)
    assert y.shape == (1, 32, 16, 16)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and torch.count_nonzero(y[:, 16:]) == 0


def test_shortcut_options_b_and_c():
    b = rk.create_model("resnet18")
    c = rk.create_model("resnet18", shortcut="C")
    n_proj = lambda m: sum(isinstance(bl.downsample, nn.Sequential) for bl in m.blocks())
    assert n_proj(b) == 3 and n_proj(c) == 8


def test_avg_down_projection_pools_then_convs():
    m = rk.create_model("resnet50d")
    ds = m.layer2[0].downsample
    assert isinstance(ds[0], nn.AvgPool2d) and ds[1].stride == (1, 1)
    assert isinstance(m.layer1[0].downsample[0], nn.Identity)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_output_stride_dilates_instead_of_striding(name):
    m = rk.create_model(name, output_stride=8, features_only=True).eval()
    assert [f["reduction"] for f in m.feature_info] == [2, 4, 8, 8, 8]
    sizes = [f.shape[-1] for f in m(torch.randn(1, 3, 64, 64))]
    assert sizes == [32, 16, 8, 8, 8]
    assert m.layer4[1].conv2.dilation == (4, 4)


def test_drop_path_linear_decay_and_eval_identity():
    m = rk.create_model("resnet18", drop_path_rate=0.3)
    rates = [b.drop_path.p if hasattr(b.drop_path, "p") else 0.0 for b in m.blocks()]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert all(b > a for a, b in zip(rates, rates[1:]))
    m.eval()
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(m(x), m(x))


def test_forward_head_and_reset_classifier():
    m = rk.create_model("resnet18").eval()
    x = torch.randn(2, 3, 64, 64)
    f = m.forward_features(x)
    assert m.forward_head(f, pre_logits=True).shape == (2, 512)
    assert torch.allclose(m.forward_head(f), m(x))
    m.reset_classifier(7)
    assert m(x).shape == (2, 7)
    m.reset_classifier(0)
    assert m(x).shape == (2, 512)


def test_features_only_info_and_indices():
    m = rk.create_model("resnet50", features_only=True, out_indices=(2, 4))
    assert m.feature_info.module_name() == ["layer2", "layer4"]
    assert m.feature_info.channels() == [512, 2048]
    outs = m.eval()(torch.randn(1, 3, 128, 128))
    assert [o.shape[1] for o in outs] == [512, 2048]
    assert m.num_classes == 0 and not any(p.numel() for p in m.fc.parameters())
    with pytest.raises(UserError, match="out_indices"):
        rk.create_model("resnet50", features_only=True, out_indices=(5,))


def test_wrong_channels_error_names_expected():
    m = rk.create_model("resnet18")
    with pytest.raises(UserError, match="expected 3 input channels, got 1"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(UserError, match="4-D batch"):
        m(torch.randn(3, 64, 64))


def test_too_small_input_names_minimum():
    m = rk.create_model("resnet50", maxpool_padding=0)
    # 1x1 -> conv1 -> 1x1 -> 3x3 max-pool without padding -> 0: 3x3 after conv1 needs >= 5.
    assert m.min_input_size == 5
    with pytest.raises(UserError, match="too small: maxpool would output an empty map.*at least 5x5"):
        m(torch.randn(1, 3, 4, 4))
    m.eval()(torch.randn(1, 3, 5, 5))


def test_the_pooled_cifar_stem_halves_the_side():
    # the CIFAR stem's 3x3 conv at full size, then a 2x2 max-pool: 28 -> 14, 7, 4 (ceil of the
    # stride-2 3x3 convs with padding 1)
    m = rk.create_model("resnet20", in_chans=1, num_classes=10, stem="cifar_pool").eval()
    sizes = {}

    def keep(name):
        def hook(mod, inputs, out):
            sizes[name] = tuple(out.shape[1:])
        return hook
    for name in ("relu", "maxpool", "layer1", "layer2", "layer3"):
        getattr(m, name).register_forward_hook(keep(name))
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert sizes == {"relu": (16, 28, 28), "maxpool": (16, 14, 14), "layer1": (16, 14, 14),
                     "layer2": (32, 7, 7), "layer3": (64, 4, 4)}
    assert [f["reduction"] for f in m.feature_info] == [1, 2, 4, 8]
