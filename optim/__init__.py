"""Optax chains. Imports no project code: models pass in their parameter roles."""

from optim.agc import adaptive_grad_clip, nfnet_optimizer
from optim.clipping import clip_each_by_norm, clip_each_then_global
from optim.ema import ema_decay, ema_update
from optim.rmsprop import tf1_rmsprop
from optim.schedules import (scaled_learning_rate, warmup_cosine, warmup_cosine_global_step,
                             warmup_exponential_decay, warmup_step_decay)

__all__ = ["adaptive_grad_clip", "clip_each_by_norm", "clip_each_then_global", "ema_decay",
           "ema_update", "nfnet_optimizer", "scaled_learning_rate", "tf1_rmsprop",
           "warmup_cosine", "warmup_cosine_global_step", "warmup_exponential_decay",
           "warmup_step_decay"]
