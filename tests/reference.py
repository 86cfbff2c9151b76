"""Importing the reference libraries the equivalence tests compare against."""

import numpy as np
import pytest


def torch():
    return pytest.importorskip("torch")


def torchvision():
    """torchvision 0.28's wheel is a CUDA build whose C ops do not load next to CPU torch; its
    model definitions only need the Python side, so the fake-op registrations are skipped."""
    torch_ = torch()
    register_fake = torch_.library.register_fake
    torch_.library.register_fake = lambda *args, **kwargs: (lambda fn: fn)
    try:
        return pytest.importorskip("torchvision")
    finally:
        torch_.library.register_fake = register_fake


def timm():
    torchvision()  # timm imports torchvision
    return pytest.importorskip("timm")


def effdet():
    """effdet (EfficientDet in PyTorch, the runnable port of the official model): imported
    with torchvision's fake-op registrations skipped (see `torchvision`) and its import-time
    `torch.jit.script` calls left as plain functions (TorchScript cannot compile them next to
    the CUDA torchvision). Build models with `pretrained=False, pretrained_backbone=False`:
    anything else downloads."""
    torch_ = torch()
    torchvision()
    script = torch_.jit.script
    torch_.jit.script = lambda fn=None, *args, **kwargs: fn
    try:
        return pytest.importorskip("effdet")
    finally:
        torch_.jit.script = script


def keras():
    """keras.applications on the JAX backend (tests/conftest.py sets KERAS_BACKEND)."""
    keras_ = pytest.importorskip("keras")
    if keras_.backend.backend() != "jax":
        pytest.skip(f"Keras was imported with the {keras_.backend.backend()} backend")
    return keras_


def randomize_keras_batchnorm(model, seed: int = 0) -> None:
    """randomize_batchnorm for a Keras model: gamma (where the layer has one: not with
    scale=False), beta, moving mean and variance."""
    keras_ = keras()
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        if isinstance(layer, keras_.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            values = [rng.rand(c) * 0.5 + 0.25, rng.randn(c) * 0.2, rng.randn(c) * 0.2,
                      rng.rand(c) + 0.5]
            layer.set_weights(values if layer.gamma is not None else values[1:])


def randomize_batchnorm(model, seed: int = 0) -> None:
    """Random BN scales, offsets and running statistics, so that eval-mode BN is exercised."""
    torch_ = torch()
    gen = torch_.Generator().manual_seed(seed)
    with torch_.no_grad():
        for module in model.modules():
            if isinstance(module, torch_.nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(torch_.rand(c, generator=gen) * 0.5 + 0.25)
                module.bias.copy_(torch_.randn(c, generator=gen) * 0.2)
                module.running_mean.copy_(torch_.randn(c, generator=gen) * 0.2)
                module.running_var.copy_(torch_.rand(c, generator=gen) + 0.5)


def he_normal_convs(model, seed: int = 0) -> None:
    """Conv weights drawn N(0, 2 / fan_in). Under eval-mode BN with O(1) running statistics,
    torch's default init (std 1 / sqrt(3 fan_in)) lets the image's signal fade block by block
    behind the BN offsets, so that the maps hardly vary with the input and a bug deep in the
    network would move the outputs by less than the tolerance."""
    torch_ = torch()
    gen = torch_.Generator().manual_seed(seed)
    with torch_.no_grad():
        for m in model.modules():
            if isinstance(m, torch_.nn.modules.conv._ConvNd):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch_.randn(m.weight.shape, generator=gen) * (2 / fan_in) ** 0.5)


def he_normal_keras_kernels(model, seed: int = 0) -> None:
    """he_normal_convs for a Keras model: every kernel drawn N(0, 2 / fan_in), fan_in counted
    per output (a depthwise kernel's is its window alone). Keras' glorot-uniform depthwise
    kernels (fan_in = window * channels) under random BatchNorm statistics leave Xception's
    logits varying by ~1e-7 between images: a comparison would not see the image at all."""
    keras()
    rng = np.random.RandomState(seed)
    for layer in model.layers:
        for weight in layer.weights:
            if weight.name.endswith("kernel"):
                shape = tuple(weight.shape)
                fan_in = np.prod(shape[:-2] if weight.name == "depthwise_kernel"
                                 else shape[:-1])
                weight.assign((rng.standard_normal(shape) * np.sqrt(2 / fan_in))
                              .astype(np.float32))
