"""The ResNet recipe of torchvision's reference scripts, for any ResNet-family variant:
90 epochs at batch 256, SGD with momentum 0.9, lr 0.1 divided by 10 at epochs 30 and 60,
weight decay 1e-4 on every parameter, random-resized crop 224 + flip; eval resizes the shorter
side to 256 and centre-crops 224. `resnet50.py`, `resnet18.py` call `recipe(name)`.

`:local` keeps the architecture and trains on the built-in dataset at 32 px with a short
cosine schedule, zero-initialised residual branches (Goyal et al. 2017) and an EMA.
"""

from __future__ import annotations

import ml_collections

from experiments import common
from nets.registry import BIAS, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, GAIN, WEIGHT


def recipe(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg)
    c = common.base()
    c.model = model
    # Declared so that --config.model_kwargs.FIELD=VALUE can change them.
    c.model_kwargs = ml_collections.ConfigDict(dict(zero_init_residual=False,
                                                    stochastic_depth_rate=0.0))
    c.data.update(dict(
        name="imagenet2012", train_split="train", eval_split="validation", num_classes=1000,
        train_size=224, test_size=224, eval_preprocess="resize_shorter_crop",
        crop_fraction=0.875, image_ops="torchvision", interpolation="bilinear",
        random_resized_crop=True, min_area=0.08, flip=True,
        workers=-1,                         # one decoding process per core
    ))
    c.batch_size = 256
    c.eval_batch_size = 256
    c.num_epochs = 90.0
    c.optimizer.update(dict(
        name="sgd", base_lr=0.1, lr_batch_base=256, momentum=0.9, nesterov=False,
        weight_decay=1e-4,
        decay_roles=(WEIGHT, GAIN, BIAS, CLASSIFIER_WEIGHT, CLASSIFIER_BIAS),
        schedule="step", warmup_epochs=0.0, step_epochs=(30.0, 60.0), step_factor=0.1,
    ))
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000

    if "local" in args:
        common.local(c, size=32, batch=64, epochs=8.0)
        c.model_kwargs.zero_init_residual = True
        c.optimizer.update(dict(schedule="cosine", warmup_epochs=1.0, base_lr=0.4,
                                weight_decay=5e-5))
        c.ema_decay = 0.999
    return c
