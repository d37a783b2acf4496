"""What a trained ResNet looks at: Grad-CAM at a stage or block, integrated gradients and
occlusion on the input pixels, each reduced to one (N, H, W) heatmap per image. Captum
computes every method; this module chooses the layer, the target class, the baseline and
the window, and checks what it is given.

The model's parameters are left as they are: Captum asks autograd for the gradients it
needs (torch.autograd.grad), which fills no parameter's .grad and needs no requires_grad on
the weights, since it differentiates with respect to the input or a layer's output."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import UserError
from ..geometry import check_input
from ..model import ResNet
from ..untrusted import shown

METHODS = ("gradcam", "integrated-gradients", "occlusion")
# Integrated gradients: Gauss-Legendre steps along the path from the baseline (Captum's
# default rule). Measured on tiny CIFAR nets, 32 steps sum to f(x) - f(0) within 1% when
# that difference is clear (a logit or more), within 10% when it is small; 64 steps
# within 2%. IG_BATCH: how many scaled images go through the net at once.
IG_STEPS = 32
IG_BATCH = 32
# Occlusion: how many occluded copies go through the net at once.
OCCLUSION_BATCH = 32


def _captum() -> Any:
    try:
        import captum.attr
    except ImportError:
        raise UserError("attributions need Captum: pip install 'resnetkit[explain]'") from None
    return captum.attr


def layer_names(model: ResNet) -> list[str]:
    """The layers Grad-CAM can look at, in forward order: every stage ("layer1", ...) and
    every residual block in it ("layer1.0", "layer1.1", ...), as named_modules() names them."""
    names = []
    for stage in model.stage_names:
        names.append(stage)
        names += [f"{stage}.{i}" for i, _ in getattr(model, stage).named_children()]
    return names


def check_model(model: Any) -> ResNet:
    """`model` in eval mode if it is a resnetkit ResNet with floating-point weights and a
    classifier, else UserError: attributions differentiate a class score through it."""
    if not isinstance(model, ResNet):
        raise UserError(f"attributions need a resnetkit ResNet whose gradients PyTorch can "
                        f"compute (load a checkpoint, run folder or tag), not "
                        f"{shown(type(model).__name__)}")
    params = list(model.parameters())
    if not params or not all(p.is_floating_point() for p in params):
        raise UserError("attributions need a ResNet with floating-point weights to take "
                        "gradients through; use the fp32 checkpoint, not a quantized copy")
    if model.features_only or not model.num_classes:
        raise UserError("the model has no classifier (features_only or num_classes=0), so "
                        "there is no class score to explain")
    return model.eval()


def check_images(model: ResNet, images: Any) -> torch.Tensor:
    """`images` as a detached copy on the model's device and dtype, if it is a non-empty
    4-D float batch with the model's channels and a size its layers accept; else UserError."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = (f"a {str(images.dtype).removeprefix('torch.')} tensor of shape "
               f"{tuple(images.shape)}" if isinstance(images, torch.Tensor)
               else shown(type(images).__name__))
        raise UserError(f"images must be a preprocessed float batch (N, C, H, W), got {got}")
    if images.shape[0] == 0:
        raise UserError("images is an empty batch: give at least one image")
    check_input(model, images)  # channels and a size every layer accepts
    p = next(model.parameters())
    # a copy, so Captum's requires_grad_() never touches the caller's tensor (nor an
    # inference-mode one, which autograd cannot use)
    return images.detach().to(p.device, p.dtype).clone()


def resolve_targets(model: ResNet, x: torch.Tensor, target: Any = None,
                    logits: torch.Tensor | None = None) -> torch.Tensor:
    """The class explained for each image of `x`, as a LongTensor of N indices: the
    predicted class (argmax of `logits`, computed when not given) for target None, one class
    for an int, one per image for a sequence or tensor of N ints. Raises UserError for a
    class out of the model's range or a count other than N."""
    n, k = len(x), model.num_classes
    if target is None:
        if logits is None:
            with torch.no_grad():
                logits = model(x)
        return logits.argmax(1)
    if hasattr(target, "__array__") and not isinstance(target, torch.Tensor):
        target = torch.as_tensor(target)  # a numpy array or scalar
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise UserError(f"target must hold class numbers, got a {target.dtype} tensor")
        values = [int(v) for v in target.reshape(-1).tolist()]
        values = values * n if target.dim() == 0 else values
    elif isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        values = list(target)
    else:
        values = [target] * n
    bad = next((v for v in values if isinstance(v, bool) or not hasattr(v, "__index__")), None)
    if bad is not None:
        raise UserError(f"target must be a class number or one per image, got {shown(repr(bad))}")
    values = [v.__index__() for v in values]
    if len(values) != n:
        raise UserError(f"{len(values)} targets given for {n} images: give one class "
                        f"number, or one per image")
    out = next((v for v in values if not 0 <= v < k), None)
    if out is not None:
        raise UserError(f"target class {out} is out of range: the model has {k} classes "
                        f"(0 to {k - 1})")
    return torch.tensor(values, dtype=torch.long, device=x.device)


def find_layer(model: ResNet, layer: Any = None) -> tuple[str, torch.nn.Module]:
    """(name, module) of a stage or block; None is the last stage ("layer4" on ImageNet nets,
    "layer3" on CIFAR nets), whose maps are the last with a spatial layout. Raises UserError
    for any other name, listing the valid ones."""
    names = layer_names(model)
    name = model.stage_names[-1] if layer is None else layer
    if name not in names:
        raise UserError(f"unknown layer {shown(repr(layer))}: this model's stages and blocks "
                        f"are {', '.join(names)}")
    return name, model.get_submodule(name)


def grad_cam(model: ResNet, images: torch.Tensor, target: Any = None,
             layer: str | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) of a batch: (N, H, W) float heatmaps at the input's
    size, on the model's device.

    Each channel of the layer's output maps A^k is weighted by the spatial mean of
    d y^c / d A^k (y^c the class's logit), the weighted sum passed through ReLU and upsampled
    bilinearly to the input (Captum's LayerGradCam and LayerAttribution.interpolate).

    model: a resnetkit ResNet, put in eval mode; its parameters keep their requires_grad and
    collect no .grad. images: a preprocessed float batch (N, C, H, W). target: None (the
    predicted class), a class number, or one per image. layer: a stage or block name
    ("layer3", "layer3.1"); None is the last stage. Raises UserError for a model, batch,
    target or layer that does not fit (see check_model, check_images, resolve_targets,
    find_layer)."""
    ca = _captum()
    model = check_model(model)
    _, module = find_layer(model, layer)
    x = check_images(model, images)
    with torch.enable_grad():
        t = resolve_targets(model, x, target)
        cam = ca.LayerGradCam(model, module).attribute(x, target=t, relu_attributions=True)
        cam = ca.LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
    return cam[:, 0].detach().float()


def integrated_gradients(model: ResNet, images: torch.Tensor, target: Any = None,
                         n_steps: int = IG_STEPS) -> torch.Tensor:
    """Integrated gradients (Sundararajan et al. 2017) from a zero baseline, per input value:
    (N, C, H, W), summing over each image to about f(x) - f(0) of the target's logit
    (completeness). Zero is the dataset's mean colour once normalised. Arguments and errors
    as for grad_cam; n_steps: the integration steps (at least 1)."""
    ca = _captum()
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise UserError(f"n_steps must be a whole number >= 1, got {shown(repr(n_steps))}")
    model = check_model(model)
    x = check_images(model, images)
    with torch.enable_grad():
        t = resolve_targets(model, x, target)
        attr = ca.IntegratedGradients(model).attribute(
            x, baselines=torch.zeros_like(x), target=t, n_steps=n_steps,
            internal_batch_size=max(IG_BATCH, len(x)))
    return attr.detach().float()


def occlusion(model: ResNet, images: torch.Tensor, target: Any = None) -> torch.Tensor:
    """Occlusion (Zeiler and Fergus 2014): how much the target's logit drops when a square
    of the image is set to zero (the mean colour once normalised), per input value
    (N, C, H, W). The window is about 1/7 of each side (32 px at 224) and slides by half of
    it, so each pixel is covered by about four windows. Arguments and errors as for
    grad_cam."""
    ca = _captum()
    model = check_model(model)
    x = check_images(model, images)
    c, h, w = x.shape[1:]
    win = (max(1, round(h / 7)), max(1, round(w / 7)))
    stride = (max(1, win[0] // 2), max(1, win[1] // 2))
    t = resolve_targets(model, x, target)
    with torch.no_grad():  # occlusion needs forward passes only
        attr = ca.Occlusion(model).attribute(
            x, sliding_window_shapes=(c, *win), strides=(c, *stride), baselines=0.0,
            target=t, perturbations_per_eval=max(1, OCCLUSION_BATCH // len(x)))
    return attr.detach().float()


def check_method(method: Any, layer: Any = None) -> str:
    """`method` if it is one of METHODS and `layer` is None unless it is "gradcam", else
    UserError (the other methods attribute to the input pixels, so a layer would be
    ignored)."""
    if method not in METHODS:
        raise UserError(f"unknown attribution method {shown(repr(method))}: choose one of "
                        f"{', '.join(METHODS)}")
    if layer is not None and method != "gradcam":
        raise UserError(f"a layer applies to gradcam only: {method} attributes to the input "
                        f"pixels")
    return method


def attribute(model: ResNet, images: torch.Tensor, method: str = "gradcam",
              target: Any = None, layer: str | None = None) -> torch.Tensor:
    """(N, H, W) heatmaps by one of METHODS: "gradcam" (see grad_cam), "integrated-gradients"
    (integrated_gradients in absolute value, summed over channels) or "occlusion"
    (occlusion summed over channels). layer applies to gradcam only. Raises UserError for
    an unknown method, a layer given to another method, and as grad_cam does."""
    check_method(method, layer)
    if method == "gradcam":
        return grad_cam(model, images, target, layer)
    if method == "integrated-gradients":
        return integrated_gradients(model, images, target).abs().sum(1)
    return occlusion(model, images, target).sum(1)
