"""DenseNet-BC (L=100, k=12) on CIFAR-10, the paper's recipe (experiments/densenet_cifar.py);
`:local` for a CPU."""

from experiments.densenet_cifar import recipe


def get_config(arg=None):
    return recipe("densenet_bc_100_12", arg)
