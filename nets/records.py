"""The records a registered variant is made of: `ModelInfo` (its builder, its configuration row,
the reference it reproduces, its task and that task's metadata) and `Preprocessing` (how its
images are prepared).

This module imports no other module of the package, so that family modules can declare their
variants as rows of `ModelInfo` without importing the registry (`nets/registry.py`, which
collects those rows and imports every family). The registry re-exports these names:
`nets.registry.ModelInfo` and `nets.registry.module_path` are the same objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for this model: normalisation (on [0, 1] pixels) and the eval
    resize-and-crop its reference was evaluated with.

    `eval_preprocess` names the input pipeline's method (`data.augment.EVAL_PREPROCESSORS`):
    "resize_shorter_crop" (torchvision: the shorter side to test_size / crop_fraction, centre
    crop), "resize_crop_32" (NFNet: the whole image to test_size + 32, centre crop) or
    "crop_resize" (TF's EfficientNet: a centre crop of test_size / (test_size + 32), resized);
    `image_ops` whose resize ("torchvision": PIL's, "tf": TF's). crop_fraction is None for a
    model evaluated on whole, uncropped images (e.g. a detector, which resizes and pads instead).
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_fraction: float | None = 0.875
    interpolation: str = "bilinear"
    eval_preprocess: str = "resize_shorter_crop"
    image_ops: str = "torchvision"


# Keras' "tf" preprocessing (MobileNets, Inception-v3, Xception): pixels scaled to [-1, 1].
UNIT_RANGE_PREPROCESSING = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# CIFAR-10 per-channel statistics of fb.resnet.torch, which the CIFAR papers' code uses (WRN,
# DenseNet, Shake-Shake); 32 px images are evaluated whole (no crop).
CIFAR10_PREPROCESSING = Preprocessing(mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
                                      std=(63.0 / 255, 62.1 / 255, 66.7 / 255),
                                      crop_fraction=1.0)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A registered variant.

    `reference` names the implementation the variant reproduces ("torchvision:resnet50",
    "timm:resnet50d", "paper:..."); the reference_* counts are that implementation's, with the
    1000-class head (`reference_params`), without it, and its BatchNorm running-statistic
    elements (means + variances). `torch_name` maps one of our module paths (dotted, without the
    root module) to the reference's PyTorch module name; it is what weight conversion uses.

    `task` is what the model's output is for ("classification"; a detector says "detection").
    Fields that only some tasks have are optional: `classifier` (the classification head's
    module name; None for a model without one) and `preprocessing.crop_fraction`; anything else
    a task needs travels in `task_metadata` (e.g. a detector's anchor configuration).
    """

    name: str
    family: str
    builder: Callable[..., Any]
    config: Mapping[str, Any]
    reference: str
    reference_params: int | None = None
    reference_params_no_head: int | None = None
    reference_bn_stat_elems: int | None = None
    train_size: int = 224
    test_size: int = 224
    preprocessing: Preprocessing = Preprocessing()
    feature_strides: tuple[int, ...] = (4, 8, 16, 32)
    # Unpadded ("valid") convs and pools shrink the maps: the smallest input side the model
    # takes, and the stages' sides for an input side `n` where they are not n // stride
    # (None: n // stride). Inception-v3: 75 px; its 299 px input gives 71, 35, 17, 8.
    min_input_size: int = 1
    feature_sizes: Callable[[int], tuple[int, ...]] | None = None
    # Video models: the clip length their inputs [B, T, H, W, C] have; None for image models.
    num_frames: int | None = None
    # The head's module name, under the root module (the one place the head is declared;
    # `nets.head_module` gives its full Haiku path); None: the model has no classifier.
    classifier: str | None = "fc"
    task: str = "classification"
    task_metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Our module paths (dotted, without the root) whose parameters stack blocks along a
    # leading axis (hk.layer_stack); a regular expression matched at the path's start.
    stacked_modules: str | None = None
    torch_name: Callable[[str, Mapping[str, Any]], str] | None = None
    # Likewise our module path -> the Keras layer name, and the keras.applications constructor
    # of the reference (for `nets.convert.from_keras`). A (layer name, offset) pair: our
    # module's weights start at that position of the layer's weight list (the pointwise half of
    # a SeparableConv2D, whose list is [depthwise_kernel, pointwise_kernel]: offset 1).
    keras_name: Callable[[str, Mapping[str, Any]], str | tuple[str, int]] | None = None
    keras_builder: str | None = None
    # Likewise our module path -> the official code's names: the official NFNet's module
    # name(s) (`nets.convert.from_nfnet_official`), or {our leaf: variable name(s)} of the
    # official EfficientDet Keras model (`nets.convert.from_efficientdet_official`); None where
    # it does not apply.
    official_name: Callable[[str, Mapping[str, Any]], Any] | None = None
    # The classifier whose features this model's `backbone` module is (a detector's): its
    # weights start the backbone (`training.transfer.as_backbone`, config.init_from).
    backbone: str | None = None

    def stage_sizes(self, size: int) -> tuple[int, ...]:
        """The side of each `features` map for square inputs of side `size`."""
        if size < self.min_input_size:
            raise ValueError(f"{self.name} takes inputs of at least {self.min_input_size} px, "
                             f"got {size}")
        if self.feature_sizes is not None:
            return tuple(self.feature_sizes(size))
        return tuple(size // s for s in self.feature_strides)


def module_path(haiku_path: str) -> str:
    """A Haiku module path without its root module and "~" scope markers, dotted:
    "resnet/~/layer1_0/conv1" -> "layer1_0.conv1". Registry name functions take these."""
    return ".".join(p for p in haiku_path.split("/")[1:] if not p.startswith("~"))
