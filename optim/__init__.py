"""Optax chains. Imports no project code: models pass in their parameter roles."""

from optim.agc import adaptive_grad_clip, nfnet_optimizer
from optim.ema import ema_decay, ema_update
from optim.rmsprop import tf1_rmsprop
from optim.schedules import (scaled_learning_rate, warmup_cosine, warmup_exponential_decay,
                             warmup_step_decay)

__all__ = ["adaptive_grad_clip", "ema_decay", "ema_update", "nfnet_optimizer",
           "scaled_learning_rate", "tf1_rmsprop", "warmup_cosine", "warmup_exponential_decay",
           "warmup_step_decay"]
