"""MobileNetV2 (torchvision's variant) on ImageNet, torchvision's reference recipe
(references/classification: `--epochs 300 --lr 0.045 --wd 0.00004 --lr-step-size 1
--lr-gamma 0.98`): SGD momentum 0.9 at lr 0.045 for batch 256, x0.98 every epoch, weight decay
4e-5 on every parameter, 300 epochs; random-resized crop 224 + flip; eval resizes the shorter
side to 256 and centre-crops 224 (bilinear). The model's dropout 0.2 is torchvision's.

`:local` keeps the architecture and the recipe's shape on the built-in dataset at 32 px.
"""

from __future__ import annotations

from experiments import common
from nets.registry import BIAS, CLASSIFIER_BIAS, CLASSIFIER_WEIGHT, GAIN, WEIGHT


def get_config(arg=None):
    args = common.parse_arg(arg)
    c = common.base()
    c.model = "mobilenet_v2"
    c.data.update(dict(
        name="imagenet2012", train_split="train", eval_split="validation", num_classes=1000,
        train_size=224, test_size=224, eval_preprocess="resize_shorter_crop",
        crop_fraction=0.875, image_ops="torchvision", interpolation="bilinear",
        random_resized_crop=True, min_area=0.08, flip=True, workers=-1,
    ))
    c.batch_size = 256
    c.eval_batch_size = 256
    c.num_epochs = 300.0
    c.optimizer.update(dict(
        name="sgd", base_lr=0.045, lr_batch_base=256, momentum=0.9, nesterov=False,
        weight_decay=4e-5,
        decay_roles=(WEIGHT, GAIN, BIAS, CLASSIFIER_WEIGHT, CLASSIFIER_BIAS),
        schedule="exponential", warmup_epochs=0.0, decay_epochs=1.0, decay_rate=0.98,
    ))
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000

    if "local" in args:
        common.local(c, size=32, batch=64, epochs=8.0)
        c.optimizer.update(dict(base_lr=0.4, warmup_epochs=1.0, decay_rate=0.8))
        c.ema_decay = 0.999
    return c
