"""The DenseNet paper's CIFAR recipe (Huang et al. 2017, section 4.2, and the authors' code
liuzhuang13/DenseNet), for any CIFAR DenseNet-BC variant: 300 epochs at batch 64, SGD with
Nesterov momentum 0.9 (dampening 0), lr 0.1 divided by 10 at 50% and 75% of the epochs (150,
225), weight decay 1e-4 on every parameter, no dropout (the paper's rate 0.2 is for the
runs without augmentation), fb.resnet.torch's mean / std normalisation and random horizontal
flips, and the paper's "C10+" translations: random 32 px crops of the image padded by 4 px
(fb.resnet.torch pads with zeros after normalising, i.e. with the mean colour); eval on the
whole 32 px images. `densenet_bc_100_12.py` calls `recipe(name)`.

Args after the file name, comma-separated: `local` (the built-in dataset on a CPU: the same
network at 16 px for 2 epochs, the schedule's two steps at 50% and 75% of them).
"""

from __future__ import annotations

import ml_collections

from experiments import common
from experiments.wrn import cifar10_data
from nets.registry import BIAS, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, GAIN, WEIGHT


def recipe(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg)
    c = common.base()
    c.model = model
    # Declared so that --config.model_kwargs.FIELD=VALUE can change them.
    c.model_kwargs = ml_collections.ConfigDict(dict(drop_rate=0.0, memory_efficient=False))
    cifar10_data(c, pad_fill="mean")
    c.batch_size = 64
    c.eval_batch_size = 256
    c.num_epochs = 300.0
    c.optimizer.update(dict(
        name="sgd", base_lr=0.1, lr_batch_base=64, momentum=0.9, nesterov=True,
        weight_decay=1e-4,
        decay_roles=(WEIGHT, GAIN, BIAS, CLASSIFIER_WEIGHT, CLASSIFIER_BIAS),
        schedule="step", warmup_epochs=0.0, step_epochs=(150.0, 225.0), step_factor=0.1,
    ))
    c.log_every = 100
    c.eval_every = 7820             # every 10 epochs (782 steps an epoch)
    c.checkpoint_every = 7820

    if "local" in args:
        common.local(c, size=16, batch=64, epochs=2.0)
        c.optimizer.update(dict(base_lr=0.1, lr_batch_base=64, step_epochs=(1.0, 1.5)))
    return c
