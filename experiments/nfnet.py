"""The NFNet recipe of Brock et al. 2021, written out from the official code
(../shared/reference/nfnet_spec.md §10-§14). `nfnet_f0.py` ... `nfnet_f7.py` call `recipe(k)`.

Args after the file name, comma-separated: `local` (the built-in dataset on a CPU), `plus`
(the F+ widths).
"""

from __future__ import annotations

import ml_collections

from experiments import common
from nets.nfnet import DROP_RATE, RAND_AUGMENT_MAGNITUDE, TRAIN_TEST_SIZE
from nets.registry import CLASSIFIER_WEIGHT, WEIGHT


def recipe(k: int, arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg)
    train_size, test_size = TRAIN_TEST_SIZE[k]
    c = common.base()
    c.model = f"nfnet_f{k}plus" if "plus" in args else f"nfnet_f{k}"
    c.model_kwargs = ml_collections.ConfigDict(dict(
        drop_rate=DROP_RATE[k],             # dropout before the classifier
        stochastic_depth_rate=0.25,         # at the last block, linear in depth
    ))
    c.data.update(dict(
        name="imagenet2012", train_split="train", eval_split="validation", num_classes=1000,
        train_size=train_size, test_size=test_size,
        eval_preprocess="resize_crop_32",   # whole image to test+32, centre crop test
        image_ops="tf", interpolation="bicubic",   # TF's crop sampler and unclamped resize
        random_resized_crop=True, min_area=0.08, flip=True,
        workers=-1,                         # one decoding process per core
        mixup_alpha=0.2, cutmix=True,       # MixUp on half the batch, CutMix on the other half
        randaugment_layers=4, randaugment_magnitude=float(RAND_AUGMENT_MAGNITUDE[k]),
        augment_before_mix=False,           # RandAugment on the mixed images
    ))
    c.batch_size = 4096
    c.eval_batch_size = 256
    c.num_epochs = 360.0
    c.label_smoothing = 0.1
    c.optimizer.update(dict(
        name="sgd_agc", base_lr=0.1, lr_batch_base=256,     # peak 1.6 at batch 4096
        momentum=0.9, nesterov=True,
        weight_decay=2e-5, decay_roles=(WEIGHT, CLASSIFIER_WEIGHT),
        agc_clipping=0.01, agc_eps=1e-3,    # every parameter but the classifier weight
        schedule="cosine", warmup_epochs=5.0,
    ))
    c.ema_decay = 0.99999
    c.compute_dtype = "auto"                # bfloat16 on accelerators; eval in float32
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 2000

    if "local" in args:
        common.local(c, size=32, batch=32, epochs=3.0)
        c.data.mixup_alpha, c.data.cutmix = 0.0, False
        c.optimizer.warmup_epochs = 0.5
        c.optimizer.base_lr = 0.4           # batch 32 would scale the paper's lr to 0.0125
        # AGC keeps clipping the zero-initialised skip gains at 1e-5 a step for a long time;
        # a short run needs a larger threshold to let them grow.
        c.optimizer.agc_clipping = 0.04
    return c
