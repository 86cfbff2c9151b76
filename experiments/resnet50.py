"""ResNet-50 on ImageNet, torchvision's reference recipe: 90 epochs at batch 256, SGD with
momentum 0.9, lr 0.1 divided by 10 at epochs 30 and 60, weight decay 1e-4 on every parameter,
random-resized crop 224 + flip; eval resizes the shorter side to 256 and centre-crops 224.

Args, comma-separated: `local` (the built-in dataset on a CPU; the README's default run),
`model=NAME` (any ResNet-family variant on the same recipe, e.g. `:local,model=resnet18`).
"""

from __future__ import annotations

from experiments import common


def get_config(arg=None):
    args = common.parse_arg(arg)
    c = common.base()
    models = [a.split("=", 1)[1] for a in args if a.startswith("model=")]
    c.model = models[0] if models else "resnet50"
    c.data.update(dict(
        name="imagenet2012", train_split="train", eval_split="validation", num_classes=1000,
        train_size=224, test_size=224, eval_preprocess="resize_shorter_crop",
        crop_fraction=0.875, interpolation="bilinear",
        random_resized_crop=True, min_area=0.08, flip=True,
    ))
    c.batch_size = 256
    c.eval_batch_size = 250
    c.num_epochs = 90.0
    c.optimizer.update(dict(
        name="sgd", base_lr=0.1, lr_batch_base=256, momentum=0.9, nesterov=False,
        weight_decay=1e-4,
        decay_roles=("weight", "gain", "bias", "classifier_weight", "classifier_bias"),
        schedule="step", warmup_epochs=0.0, step_epochs=(30.0, 60.0), step_factor=0.1,
    ))
    c.compute_dtype = "auto"
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000

    if "local" in args:
        common.local(c, size=32, batch=64, epochs=8.0)
        c.optimizer.update(dict(schedule="cosine", warmup_epochs=1.0, base_lr=0.4,
                                weight_decay=5e-5))
        c.ema_decay = 0.999
    return c
