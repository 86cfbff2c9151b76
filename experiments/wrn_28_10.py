"""WRN-28-10 on CIFAR-10, the paper's recipe (experiments/wrn.py); `:dropout` for
WRN-28-10-dropout (0.3), `:local` for a CPU."""

from experiments.wrn import recipe


def get_config(arg=None):
    return recipe("wrn_28_10", arg)
