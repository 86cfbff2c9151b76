"""The Wide ResNet paper's CIFAR recipe (Zagoruyko & Komodakis 2016, section 3 and the authors'
code szagoruyko/wide-residual-networks), for any WRN variant: 200 epochs at batch 128, SGD with
Nesterov momentum 0.9 (dampening 0), lr 0.1 multiplied by 0.2 at epochs 60, 120 and 160, weight
decay 5e-4 on every parameter (the code's SGD decays them all), fb.resnet.torch's mean / std
normalisation, random horizontal flips and random 32 px crops of the image padded by 4 px by
reflection (the authors' code); eval on the whole 32 px images. `wrn_28_10.py` calls
`recipe(name)`.

Args after the file name, comma-separated: `dropout` (the paper's "WRN-n-k-dropout": dropout
0.3 between each block's two convs), `local` (the built-in dataset on a CPU: the same network at
8 px, the digits' own resolution, since WRN-28-10 costs 5.2 GMACs an image at 32 px (0.33 at
8 px); one epoch at batch 32 with the schedule's three steps at the same fractions of it).
"""

from __future__ import annotations

import ml_collections

from experiments import common
from nets.registry import BIAS, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, GAIN, WEIGHT

# fb.resnet.torch's CIFAR-10 statistics (nets.records.CIFAR10_PREPROCESSING), in pixel units.
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)


def cifar10_data(c: ml_collections.ConfigDict, pad_fill: str) -> None:
    """CIFAR-10 from TFDS (`cifar10`: 50,000 train, 10,000 test), whole 32 px images (the eval
    resize to 32 / 1.0 and centre crop 32 is the identity), flips and 4 px translations whose
    padding is `pad_fill`; shared with DenseNet-BC."""
    c.data.update(dict(
        name="cifar10", train_split="train", eval_split="test", num_classes=10,
        train_size=32, test_size=32, eval_preprocess="resize_shorter_crop", crop_fraction=1.0,
        image_ops="torchvision", interpolation="bilinear", mean=CIFAR10_MEAN, std=CIFAR10_STD,
        random_resized_crop=False, flip=True, pad_crop=4, pad_fill=pad_fill,
        workers=0,                  # 32 px: threads beat processes
    ))


def recipe(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg)
    c = common.base()
    c.model = model
    # Declared so that --config.model_kwargs.dropout_rate=... can change it.
    c.model_kwargs = ml_collections.ConfigDict(dict(
        dropout_rate=0.3 if "dropout" in args else 0.0))
    cifar10_data(c, pad_fill="reflect")
    c.batch_size = 128
    c.eval_batch_size = 256
    c.num_epochs = 200.0
    c.optimizer.update(dict(
        name="sgd", base_lr=0.1, lr_batch_base=128, momentum=0.9, nesterov=True,
        weight_decay=5e-4,
        decay_roles=(WEIGHT, GAIN, BIAS, CLASSIFIER_WEIGHT, CLASSIFIER_BIAS),
        schedule="step", warmup_epochs=0.0, step_epochs=(60.0, 120.0, 160.0), step_factor=0.2,
    ))
    c.log_every = 100
    c.eval_every = 3910             # every 10 epochs (391 steps an epoch)
    c.checkpoint_every = 3910

    if "local" in args:
        common.local(c, size=8, batch=32, epochs=1.0)
        # lr 0.1 x 32 / 64; the steps at 30%, 60% and 80% of the run, as at epochs 60, 120 and
        # 160 of 200.
        c.optimizer.update(dict(base_lr=0.1, lr_batch_base=64, step_epochs=(0.3, 0.6, 0.8)))
    return c
