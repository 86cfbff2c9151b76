"""The record each registered variant carries: its builder, its configuration row, the reference
it reproduces, and the preprocessing it is evaluated with. Family modules declare variants as
rows of `ModelInfo`; `nets/__init__.py` collects them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for this model: normalisation and the eval resize-and-crop.

    Eval resizes the shorter side to test_size / crop_fraction and centre-crops test_size.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    crop_fraction: float = 0.875
    interpolation: str = "bilinear"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A registered variant.

    `reference` names the implementation the variant reproduces ("torchvision:resnet50",
    "timm:resnet50d", "paper:..."); the reference_* counts are that implementation's, with the
    1000-class head (`reference_params`), without it, and its BatchNorm running-statistic
    elements (means + variances). `torch_name` maps one of our module paths (dotted, without the
    root module) to the reference's PyTorch module name; it is what weight conversion uses.
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
    # Video models: the clip length their inputs [B, T, H, W, C] have; None for image models.
    num_frames: int | None = None
    classifier: str = "fc"  # the head's module name, under the root module
    # Our module paths (dotted, without the root) whose parameters stack blocks along a
    # leading axis (hk.layer_stack); a regular expression matched at the path's start.
    stacked_modules: str | None = None
    torch_name: Callable[[str, Mapping[str, Any]], str] | None = None
    # Likewise our module path -> the Keras layer name, and the keras.applications constructor
    # of the reference (for `nets.convert.from_keras`).
    keras_name: Callable[[str, Mapping[str, Any]], str] | None = None
    keras_builder: str | None = None


def module_path(haiku_path: str) -> str:
    """A Haiku module path without its root module and "~" scope markers, dotted:
    "resnet/~/layer1_0/conv1" -> "layer1_0.conv1". Registry name functions take these."""
    return ".".join(p for p in haiku_path.split("/")[1:] if not p.startswith("~"))
