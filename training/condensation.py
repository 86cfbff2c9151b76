"""The condensation task: classification of a CondenseNet in its training form
(`model_kwargs.condensed=False`), whose learned group convolutions are condensed as the authors'
main.py does (ShichenLiu/CondenseNet): at the start of each step the masks (model state) are
condensed to the stage the step count gives (`nets.condensenet.condensation_stage`: C - 1 stages
over the first half of training, then the masks stay fixed), and while condensing the loss adds
`config.condensation.group_lasso_lambda` times the group lasso of the masked 1x1 weights.

Everything else - data, evaluation (of the masked network), reports - is classification's. The
masks live in the checkpointed model state and follow from the step count, so a run resumed
after SIGTERM condenses at the same steps as one that was never stopped.
`nets.condensenet.convert` turns the trained variables into the inference form.
"""

from __future__ import annotations

import jax.numpy as jnp

import nets
from nets import condensenet
from training import classification, steps
from training.tasks import Task


def _model_config(config) -> dict:
    info = nets.model_info(config.model)
    return {**info.config, **config.model_kwargs.to_dict()}


def validate(config) -> None:
    classification.validate(config)
    if nets.model_info(config.model).family != "condensenet":
        raise ValueError(f"task condensation trains a CondenseNet (nets.list_models("
                         f"'condensenet*')), not {config.model}")
    if _model_config(config).get("condensed", True):
        raise ValueError("task condensation trains the training form: set "
                         "--config.model_kwargs.condensed=False")
    if config.ema_decay:
        raise ValueError("task condensation keeps no EMA (config.ema_decay must be 0): an "
                         "average of the 0/1 masks would be no mask")
    if config.condensation.group_lasso_lambda < 0:
        raise ValueError(f"config.condensation.group_lasso_lambda must be >= 0, got "
                         f"{config.condensation.group_lasso_lambda}")


def objective(config, model, *, dtype) -> steps.Objective:
    factor = _model_config(config)["condense_factor"]
    base = classification.TASK.objective(config, model, dtype=dtype)
    weight = config.condensation.group_lasso_lambda

    def update_state(params, model_state, step, total_steps):
        stage = condensenet.condensation_stage(step, total_steps, factor)
        return condensenet.condense(params, model_state, stage, condense_factor=factor)

    def loss(params, model_state, rng, batch, extra=None):
        value, (new_state, metrics) = base.loss(params, model_state, rng, batch, extra)
        lasso = jnp.where(condensenet.condensing(model_state, factor),
                          condensenet.group_lasso(params, model_state), 0.0)
        stage = condensenet.condensed_stage(model_state, factor)
        return value + weight * lasso, (new_state, {**metrics, "group_lasso": lasso,
                                                    "condensation_stage": stage})

    note = (f"condensation: C = {factor}, {factor - 1} stages over the first half of training, "
            f"group lasso weight {weight}")
    return base._replace(loss=loss, update_state=update_state, notes=(*base.notes, note))


TASK: Task = classification.TASK._replace(name="condensation", validate=validate,
                                          objective=objective)
