"""CondenseNet-74 on ImageNet, the authors' recipe (ShichenLiu/CondenseNet script.sh and
main.py): 120 epochs at batch 256, SGD with Nesterov momentum 0.9, lr 0.1 on a per-step cosine
to 0, weight decay 1e-4 on every parameter, group lasso 1e-5 while condensing; random-resized
crop 224 + flip, eval resizes the shorter side to 256 and centre-crops 224. It trains the
training form (learned group convs with masks, `condensed=False`) under task "condensation"
(training/condensation.py): C - 1 = 3 condensing stages in the first 60 epochs.
`nets.condensenet.convert` then gives the registered inference form. `:g8` trains C = G = 8.

`:local` keeps the architecture and the schedule's shape (every stage is passed) on the
built-in dataset at 32 px.
"""

from __future__ import annotations

import ml_collections

from experiments import common
from nets.registry import BIAS, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, GAIN, WEIGHT


def get_config(arg=None):
    args = common.parse_arg(arg)
    c = common.base()
    c.task = "condensation"
    c.model = "condensenet74_c8_g8" if "g8" in args else "condensenet74_c4_g4"
    # Declared so that --config.model_kwargs.FIELD=VALUE can change them.
    c.model_kwargs = ml_collections.ConfigDict(dict(condensed=False, dropout_rate=0.0))
    c.condensation.group_lasso_lambda = 1e-5
    c.data.update(dict(
        name="imagenet2012", train_split="train", eval_split="validation", num_classes=1000,
        train_size=224, test_size=224, eval_preprocess="resize_shorter_crop",
        crop_fraction=0.875, image_ops="torchvision", interpolation="bilinear",
        random_resized_crop=True, min_area=0.08, flip=True, workers=-1,
    ))
    c.batch_size = 256
    c.eval_batch_size = 256
    c.num_epochs = 120.0
    c.optimizer.update(dict(
        name="sgd", base_lr=0.1, lr_batch_base=256, momentum=0.9, nesterov=True,
        weight_decay=1e-4,
        decay_roles=(WEIGHT, GAIN, BIAS, CLASSIFIER_WEIGHT, CLASSIFIER_BIAS),
        schedule="cosine", warmup_epochs=0.0,
    ))
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000

    if "local" in args:
        common.local(c, size=32, batch=64, epochs=8.0)
    return c
