"""NFNet-F0 on ImageNet, the paper's recipe (see experiments/nfnet.py); `:local` for a CPU."""

from experiments.nfnet import recipe


def get_config(arg=None):
    return recipe(0, arg)
