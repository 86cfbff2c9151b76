"""ResNet-50 on ImageNet, torchvision's recipe (experiments/resnet.py); `:local` for a CPU."""

from experiments.resnet import recipe


def get_config(arg=None):
    return recipe("resnet50", arg)
