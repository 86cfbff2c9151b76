"""MobileNetV2 distilled from a trained ResNet-50 (Hinton et al. 2015): torchvision's MobileNetV2
recipe (experiments/mobilenet_v2.py) with the loss alpha * CE + (1 - alpha) * T^2 * KL against
the ResNet-50's eval-mode outputs on the same images, alpha 0.5 and T 4 (training/distill.py).

    python train.py --config experiments/distill_mobilenet_v2.py \\
        --config.distill.teacher_from=resnet50.safetensors     # python -m tools.convert ...
        # or torchvision's resnet50.pth itself (training/weight_sources.py reads state dicts)

`:local` distils on the built-in dataset at 32 px from a ResNet-50 trained there (its EMA
weights, the ones that run reports):

    python train.py --config experiments/resnet50.py:local          # -> runs/resnet50-local
    python train.py --config experiments/distill_mobilenet_v2.py:local \\
        --config.distill.teacher_from=runs/resnet50-local
"""

from __future__ import annotations

from experiments import common, mobilenet_v2

REQUIRED = (("distill.teacher_from",
             "the teacher's weights: a resnet50 nets.weights file for the data's classes "
             "(python -m tools.convert --from torch SRC --model resnet50 --out "
             "resnet50.safetensors) or the workdir of a resnet50 run (python train.py --config "
             "experiments/resnet50.py:local writes runs/resnet50-local)"),)


def get_config(arg=None):
    c = mobilenet_v2.get_config(arg)
    c.task = "distillation"
    c.required = REQUIRED
    c.distill.update(dict(teacher="resnet50", teacher_from="", teacher_ema=False, alpha=0.5,
                          temperature=4.0))
    if "local" in common.parse_arg(arg):
        c.distill.teacher_ema = True   # the :local ResNet-50 reports its EMA's accuracy
    return c
