"""Training: the train state, the sharded steps, checkpoints, metrics and the loop."""

from training.checkpoint import CheckpointMismatchError, CheckpointUnreadableError
from training.loop import ConfigError, NonFiniteLossError, run

__all__ = ["CheckpointMismatchError", "CheckpointUnreadableError", "ConfigError",
           "NonFiniteLossError", "run"]
