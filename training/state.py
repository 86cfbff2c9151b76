"""The train state: one pytree that the step takes, donates and returns, and orbax saves."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
    step: jax.Array            # int32: updates applied so far
    rng: jax.Array             # uint32 key data; step t uses fold_in(rng, t)
    params: Any
    model_state: Any           # BatchNorm running statistics
    opt_state: Any
    ema_params: Any            # None when the config keeps no EMA
    ema_model_state: Any
