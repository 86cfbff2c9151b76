"""EfficientDet-D0 with the design notes' anchor-free point head (`efficientdet_d0_keypoints`,
efficientdet_spec.md §18; issue 21): EfficientDet-D0's recipe (experiments/efficientdet.py) with
task "keypoints" (training/keypoints.py): one point per object, its class, on the P3 grid,
evaluated by recall / precision within 2 and 4 px and the mean error of the matched points.

The dataset must have points (objects' "point" feature): COCO's TFDS build has none, so the
default config names coco/2017 only as the recipe's shape; `:local` trains on the built-in
sklearn_digits_detection (a point per digit, its box centre) at 128 px on a CPU.

Args after the file name, comma-separated: `local`.
"""

from __future__ import annotations

import ml_collections

from experiments import common
from experiments.efficientdet import local as detection_local
from experiments.efficientdet import recipe


def get_config(arg=None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg)
    c = recipe("d0")
    c.task = "keypoints"
    c.model = "efficientdet_d0_keypoints"
    if "local" in args:
        local(c)
    return c


def local(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """EfficientDet's `:local` (experiments/efficientdet.py: the built-in detection dataset at
    128 px) with this head's schedule."""
    detection_local(c)
    return c
