"""The training step (train.TrainStep), compiled or eager, and the decision to compile it."""
import copy

import pytest
import torch

from resnetkit.errors import UserError
from resnetkit.runtime import compiling
from resnetkit.runtime.compiling import (PAYS_AFTER_S, can_compile, decide_compile,
                                         estimated_train_s, forward_flop)
from resnetkit.train.config import TrainConfig
from resnetkit.train.optim import build_optimizer
from resnetkit.train.step import TrainStep
from resnetkit.zoo import create_model


def _steps(model, compile, batches):
    """Losses of a step on each batch, the weights' change in the first step, the step."""
    opt = build_optimizer(model, TrainConfig(lr=0.05))
    step = TrainStep(model, model, opt, None, torch.device("cpu"), "fp32", compile=compile)
    before = copy.deepcopy(model.state_dict())
    losses = [step([batches[0]])[0].item() / len(batches[0][1])]
    change = {k: v - before[k] for k, v in model.state_dict().items() if v.is_floating_point()}
    losses += [step([(x, y)])[0].item() / len(y) for x, y in batches[1:]]
    return losses, change, step


@pytest.mark.skipif(not can_compile("cpu"), reason="torch.compile needs a C++ compiler")
def test_the_compiled_step_trains_like_the_eager_one():
    torch.manual_seed(0)
    # one block a stage (an 8-layer ResNet): every kind of layer, a third of the graph to compile
    model = create_model("resnet20", in_chans=1, num_classes=10, widths=(4, 8, 8), stem_width=4,
                         layers=(1, 1, 1))
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))
               for _ in range(3)]
    eager, de, e = _steps(model, False, batches)
    compiled, dc, c = _steps(twin, True, batches)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert eager[2] < eager[0]  # it learns
    # Inductor's BN reductions sum in another order (about 10x the eager rounding error
    # against fp64 here): the first step's change of every tensor within 1% of its scale,
    # where a wrong gradient would be far off
    for k in de:
        assert (de[k] - dc[k]).abs().max() <= 0.01 * de[k].abs().max(), k
    assert e.compile_s == 0 and c.compile_s > 0 and c.compiled


def test_compile_is_decided_from_the_run_and_the_machine(monkeypatch):
    assert decide_compile(False, "cpu", "bf16", lambda: 1e9) == (False, "asked for")
    with pytest.raises(UserError, match="auto, true or false"):
        decide_compile("yes", "cpu", "bf16", lambda: 1.0)
    monkeypatch.setattr(compiling, "can_compile", lambda device: True)
    assert decide_compile("auto", "cpu", "bf16", lambda: PAYS_AFTER_S)[0]
    assert not decide_compile("auto", "cpu", "bf16", lambda: PAYS_AFTER_S - 1)[0]  # the quick demo
    assert not decide_compile("auto", "cpu", "bf16", lambda: 1e9, world=2)[0]
    assert not decide_compile("auto", "cpu", "fp64", lambda: 1e9)[0]
    assert decide_compile("auto", "cpu", "bf16", lambda: 1e9, widest=64)[0]  # ResNet-20
    assert not decide_compile("auto", "cpu", "bf16", lambda: 1e9, widest=2048)[0]  # ResNet-50
    assert not decide_compile("auto", "cuda", "bf16", lambda: float("inf"))[0]  # a GPU of unknown peak
    monkeypatch.setattr(compiling, "can_compile", lambda device: False)
    assert decide_compile("auto", "cpu", "bf16", lambda: 1e9) == (False, "no C++ compiler for torch.compile")
    with pytest.raises(UserError, match="C\\+\\+ compiler"):
        decide_compile(True, "cpu", "fp32", lambda: 1.0)


def test_a_run_length_estimate_from_counted_flop():
    # ResNet-20 on 1x28x28 by hand (option A shortcuts: no convs there), a multiply-add = 2 FLOP
    macs = (1 * 16 * 9 * 28 ** 2 + 6 * 16 * 16 * 9 * 28 ** 2
            + (16 * 32 + 5 * 32 * 32) * 9 * 14 ** 2 + (32 * 64 + 5 * 64 * 64) * 9 * 7 ** 2 + 64 * 10)
    model = create_model("resnet20", in_chans=1, num_classes=10).train()
    assert forward_flop(model, 1, 28) == 2 * macs
    assert model.training  # left as it was
    assert estimated_train_s(3e12, "fp32", 100.0) == pytest.approx(3e12 / (100e9 * 0.3))
    assert estimated_train_s(1.0, "bf16", None) == float("inf")
