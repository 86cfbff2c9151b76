"""EfficientNet-B0 on ImageNet, the paper's recipe (experiments/efficientnet.py); `:local`."""

from experiments.efficientnet import recipe


def get_config(arg=None):
    return recipe(0, arg)
