"""EfficientDet-D6 on COCO, the official recipe (see experiments/efficientdet.py); `:local`
for a CPU."""

from experiments.efficientdet import recipe


def get_config(arg=None):
    return recipe("d6", arg)
