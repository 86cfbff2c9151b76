"""Trains a model from an experiment config.

    python train.py                                          # ResNet-18 on the built-in dataset
    python train.py --config experiments/nfnet_f1.py         # the paper's recipe on ImageNet
    python train.py --config experiments/nfnet_f1.py:local   # the same model on a CPU
    python train.py --config experiments/resnet50.py --config.batch_size=512 --workdir runs/r50

A run resumes from the newest checkpoint in its workdir (a config that changes the run's meaning
is refused there: training/resume.py). Exit status 0: finished; 1: a run error; 2: a usage or
config error; 75: stopped by SIGTERM after writing a checkpoint (run it again). Multi-host: run
the same command on every host (with --coordinator_address, --num_processes and --process_id
where JAX cannot find the cluster by itself).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

DEFAULT_CONFIG = "experiments/resnet18.py:local"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, f"Experiment config file[:arg] (default {DEFAULT_CONFIG}); override fields "
    "with --config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "Checkpoints, metrics.jsonl and TensorBoard logs; default "
    "runs/<experiment>[-<arg>][-<hash of the --config overrides>].")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "This process's index.")


def _fail(message: str):
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl parsing, with config errors (a mistyped --config.key) as one clear line."""
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = [argv[0], f"--config={os.path.join(os.path.dirname(__file__), DEFAULT_CONFIG)}",
                *argv[1:]]
        sys.argv = argv   # ml_collections reads the overrides from sys.argv
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError, TypeError, ValueError, flags.Error) as e:
        text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        text = " ".join(re.sub(r"\\n|[\\'\"]", " ", text).split()).replace(" Did", ". Did")
        if not isinstance(e, (KeyError, AttributeError)):
            _fail(text)
        _fail(f"unknown config field {text.replace(' ?', '?')}. --config.FIELD=VALUE changes "
              "a field the config defines (experiments/common.py lists them); it cannot add one.")


# Exit statuses: 0 finished, 1 a run error (data, checkpoint, non-finite loss), 2 a usage or
# config error, PREEMPTED after SIGTERM once the checkpoint is written (sysexits' EX_TEMPFAIL:
# not done, run the same command again).
PREEMPTED = 75


def default_workdir(config_flag: str, argv: list[str]) -> str:
    """runs/<experiment>[-<arg>][-<hash of the --config.* overrides>]: two configs never share
    a workdir; the same overrides in any order give the same one."""
    path, _, arg = config_flag.partition(":")
    name = os.path.splitext(os.path.basename(path))[0] + (f"-{arg.replace(',', '-')}"
                                                          if arg else "")
    overrides = sorted(a + ("" if "=" in a or i + 1 == len(argv) else f"={argv[i + 1]}")
                       for i, a in enumerate(argv) if a.startswith("--config."))
    if overrides:
        name += "-" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    return os.path.join("runs", name)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)   # orbax logs every file it writes at INFO
    import training
    from training import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    import data
    workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(
        flags.FLAGS["config"]), sys.argv)
    try:
        results = training.run(_CONFIG.value, workdir)
    except training.ConfigError as e:   # one line per problem, like a flag error: status 2
        for line in str(e).splitlines():
            print(f"train.py: error: {line}", file=sys.stderr)
        sys.exit(2)
    except (data.DatasetNotFoundError, data.UnreadableImageError, data.ImageFolderError,
            data.DetectionDataError,
            training.CheckpointMismatchError, training.CheckpointUnreadableError,
            training.NonFiniteLossError, NotImplementedError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    if results.preempted:
        sys.exit(PREEMPTED)
    if results.final_line:
        print(results.final_line)

if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
