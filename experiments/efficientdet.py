"""The EfficientDet recipe of Tan, Pang & Le 2020, written out from the official google/automl
code (../shared/reference/efficientdet_spec.md §11-§13). `efficientdet_d0.py` ...
`efficientdet_d7x.py` call `recipe(key)`.

Officially training starts from an ImageNet EfficientNet backbone: pass its weights with
--config.init_from=FILE (the backbone is loaded by name, the BiFPN and heads start fresh).

Args after the file name, comma-separated: `local` (the built-in detection dataset on a CPU).
"""

from __future__ import annotations

import ml_collections

from experiments import common
from nets.efficientdet import ROWS
from nets.registry import CLASSIFIER_WEIGHT, WEIGHT

COCO_TRAIN_EXAMPLES = 118_287   # TFDS coco/2017 train


def recipe(key: str, arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg)
    size = ROWS[key][1]
    c = common.base()
    c.task = "detection"
    c.model = f"efficientdet_{key}"
    c.data.update(dict(
        name="coco/2017", train_split="train", eval_split="validation",
        num_classes=90,                     # COCO category ids 1..90, the official heads
        train_size=size, test_size=size,
        mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD,
        flip=True, scale_min=0.1, scale_max=2.0,   # scale jitter, then crop / pad
        max_boxes=100,
        workers=-1,
    ))
    c.batch_size = 128                      # the paper's (32 TPUv3 cores)
    c.eval_batch_size = 64
    c.num_epochs = 600.0 if key in ("d7", "d7x") else 300.0
    c.label_smoothing = 0.0
    c.optimizer.update(dict(
        name="sgd", base_lr=0.08, lr_batch_base=64,     # peak 0.16 at batch 128
        momentum=0.9, nesterov=False,
        # 4e-5 * 1/2 |w|^2 on conv kernels only (names ending in kernel / weight)
        weight_decay=4e-5, decay_roles=(WEIGHT, CLASSIFIER_WEIGHT),
        schedule="cosine_global_step", warmup_epochs=1.0, warmup_init=0.008,
        grad_clip_norm=10.0,                # each gradient, then all, to norm 10
    ))
    c.ema_decay = 0.9998                    # with the TF1 warm-up, min(d, (1 + t) / (10 + t))
    c.compute_dtype = "auto"                # bfloat16 on accelerators
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2000

    if "local" in args:
        local(c)
    return c


def local(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The same architecture and recipe on the built-in detection dataset (scikit-learn's digits
    pasted on 128 px canvases, data/builtin_detection.py) at 128 px, from scratch: 562 steps,
    about ten minutes on a 2-core CPU."""
    from data import builtin_detection

    c.data.update(dict(
        name=builtin_detection.NAME, train_split="train", eval_split="test",
        num_classes=len(builtin_detection.CLASS_NAMES), train_size=128, test_size=128,
        flip=False,                         # digits are not mirror-symmetric
        scale_min=0.8, scale_max=1.2,       # the digits are small already
        max_boxes=8, workers=0,
    ))
    c.batch_size = 16
    c.eval_batch_size = 60
    # From scratch: 2 epochs reached AP 0.7 (EMA), 6 epochs AP 30.7 / AP50 43.4 (README).
    c.num_epochs = 6.0
    c.optimizer.update(dict(base_lr=0.08, lr_batch_base=16, warmup_epochs=0.25,
                            warmup_init=0.008))
    c.ema_decay = 0.99
    c.log_every = 10
    c.checkpoint_every = 100
    c.eval_every = 0
    return c
