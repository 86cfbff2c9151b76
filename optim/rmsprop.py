"""RMSProp as TF1's `tf.train.RMSPropOptimizer`, the optimizer of the EfficientNet and
MobileNet papers (decay 0.9, momentum 0.9, epsilon 1e-3):

    ms  = decay * ms + (1 - decay) * g**2          (ms starts at 1, not 0)
    mom = momentum * mom + lr * g / sqrt(ms + eps)
    w  -= mom

optax's rmsprop computes exactly this with initial_scale=1 and eps inside the square root; the
learning rate is applied before the momentum trace, as in TF1, so a schedule acts alike.
"""

from __future__ import annotations

import optax


def tf1_rmsprop(learning_rate: optax.ScalarOrSchedule, decay: float = 0.9,
                momentum: float = 0.9, eps: float = 1e-3) -> optax.GradientTransformation:
    return optax.rmsprop(learning_rate, decay=decay, eps=eps, initial_scale=1.0,
                         eps_in_sqrt=True, momentum=momentum)
