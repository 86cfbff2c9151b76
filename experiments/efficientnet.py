"""The EfficientNet recipe of Tan & Le 2019, as the official TF code (tensorflow/tpu
models/official/efficientnet) trains it. `efficientnet_b0.py` calls `recipe(0)`.

RMSProp (TF1: decay 0.9, momentum 0.9, epsilon 1e-3) at lr 0.016 per 256 images - 0.256 at the
paper's batch 4096 - warmed up linearly over 5 epochs and decayed x0.97 every 2.4 epochs; 350
epochs; L2 weight decay 1e-5; BatchNorm decay 0.99 (the model's); EMA 0.9999; label smoothing
0.1; dropout 0.2-0.5 by variant and drop connect 0.2; TF's Inception crop and bicubic resize;
eval: centre crop of size / (size + 32), bicubic resize.

Differences, on purpose: the released B0-B5 checkpoints used AutoAugment (policy v0), which is
not implemented here; this recipe uses the official code's other option, RandAugment with 2
layers at magnitude 10. The official L2 term also covers the SE convs' biases; here biases are
not told apart from BatchNorm offsets, so only weights and the classifier are decayed.

`:local` keeps the architecture and the optimizer on the built-in dataset at 32 px.
"""

from __future__ import annotations

import ml_collections

from experiments import common
from nets.efficientnet import SCALING
from nets.registry import CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, WEIGHT


def recipe(k: int, arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg)
    _, _, size, dropout = SCALING[k]
    c = common.base()
    c.model = f"efficientnet_b{k}"
    c.model_kwargs = ml_collections.ConfigDict(dict(
        dropout_rate=dropout,               # before the classifier
        drop_connect_rate=0.2,              # residual branches, linear in block index from 0
        bn_decay=0.99,                      # Keras' BatchNorm momentum
    ))
    c.data.update(dict(
        name="imagenet2012", train_split="train", eval_split="validation", num_classes=1000,
        train_size=size, test_size=size,
        eval_preprocess="crop_resize",      # centre size / (size + 32) of the image, resized
        image_ops="tf", interpolation="bicubic",
        random_resized_crop=True, min_area=0.08, flip=True,
        randaugment_layers=2, randaugment_magnitude=10.0, augment_before_mix=True,
        workers=-1,
    ))
    c.batch_size = 4096
    c.eval_batch_size = 256
    c.num_epochs = 350.0
    c.label_smoothing = 0.1
    c.optimizer.update(dict(
        name="rmsprop", base_lr=0.016, lr_batch_base=256,   # 0.256 at batch 4096
        momentum=0.9, rms_decay=0.9, rms_eps=1e-3,
        weight_decay=1e-5, decay_roles=(WEIGHT, CLASSIFIER_WEIGHT, CLASSIFIER_BIAS),
        schedule="exponential", warmup_epochs=5.0, decay_epochs=2.4, decay_rate=0.97,
    ))
    c.ema_decay = 0.9999
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000

    if "local" in args:
        common.local(c, size=32, batch=64, epochs=8.0)
        c.optimizer.update(dict(warmup_epochs=1.0, decay_epochs=1.0, decay_rate=0.8))
        # Keras' BatchNorm decay 0.99 leaves the running statistics far behind the weights in
        # a 180-step run; 0.9 lets eval see what training saw.
        c.model_kwargs.bn_decay = 0.9
        c.ema_decay = 0.999
    return c
