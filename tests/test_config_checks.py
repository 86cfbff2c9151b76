"""Config values that would crash a run late or train it silently wrong are refused before
anything is built: one line per problem, all at once (training/config_checks.py); train.py
prints them and exits 2."""

import os
import pathlib
import subprocess
import sys
import time
import types

import jax
import numpy as np
import optax
import pytest

import nets
import optim
from experiments import common
from tests.test_experiments import EXPERIMENTS, load
from training import config_checks, loop, optimizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIGITS_TRAIN_EXAMPLES = 1437   # the built-in dataset's train split


def config_with(**overrides):
    """resnet18:local with `overrides` ({"optimizer.name": "adamw", ...})."""
    config = load("resnet18", "local")
    for dotted, value in overrides.items():
        *parents, field = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[field] = value
    return config


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("arg", [None, "local"])
def test_every_experiment_config_has_no_problem(name, arg):
    config = load(name, arg)
    assert config_checks.problems(config, num_devices=1) == []
    if arg != "local":   # the recipes also run as written on an 8-device host (a TPU v3-8)
        assert config_checks.problems(config, num_devices=8) == []
    if arg == "local":
        assert config_checks.train_split_problems(config, DIGITS_TRAIN_EXAMPLES) == []


# (overrides, what the one line says after "config.")
BAD = [
    ({"batch_size": 0}, "batch_size=0 must be positive"),
    ({"eval_batch_size": -8}, "eval_batch_size=-8 must be positive"),
    ({"log_every": 0}, "log_every=0 must be positive"),
    ({"checkpoint_every": 0}, "checkpoint_every=0 must be positive"),
    ({"eval_every": -1}, "eval_every=-1 must be >= 0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0 must be >= 1"),
    ({"keep_checkpoints": -1}, "keep_checkpoints=-1 must be >= 1"),
    ({"num_steps": -5}, "num_steps=-5 must be >= 0"),
    ({"num_epochs": 0.0}, "num_epochs=0.0 must be positive when config.num_steps is 0"),
    ({"optimizer.base_lr": 0.0}, "optimizer.base_lr=0.0 must be positive"),
    ({"optimizer.base_lr": -0.1}, "optimizer.base_lr=-0.1 must be positive"),
    ({"optimizer.weight_decay": -1e-4}, "optimizer.weight_decay=-0.0001 must be >= 0"),
    ({"optimizer.momentum": 1.0}, "optimizer.momentum=1.0 must be in [0, 1)"),
    ({"optimizer.momentum": -0.1}, "optimizer.momentum=-0.1 must be in [0, 1)"),
    ({"optimizer.warmup_epochs": 8.0}, "optimizer.warmup_epochs=8.0 is not shorter than the "
                                       "run (config.num_epochs=8.0)"),
    ({"optimizer.name": "adamw"}, "optimizer.name='adamw' is not an optimizer. Choose from: "
                                  "sgd, sgd_agc, rmsprop"),
    ({"optimizer.name": "sdg"}, "optimizer.name='sdg' is not an optimizer. Did you mean: sgd"),
    ({"optimizer.schedule": "cosin"}, "optimizer.schedule='cosin' is not a schedule. Did you "
                                      "mean: cosine?"),
    ({"optimizer.schedule": "exponential", "optimizer.decay_epochs": 0.0},
     "optimizer.decay_epochs=0.0 must be positive"),
    ({"compute_dtype": "bfloat"}, "compute_dtype='bfloat' is not a compute dtype. Did you "
                                  "mean: bfloat16"),
    ({"compute_dtype": "float16"}, "compute_dtype='float16' needs loss scaling"),
    ({"data.eval_preprocess": "resize_crop32"}, "data.eval_preprocess='resize_crop32' is not an "
                                                "eval preprocessing. Did you mean: resize_crop_32"),
    ({"data.image_ops": "pil"}, "data.image_ops='pil' is not an image-ops family. Choose "
                                "from: tf, torchvision"),
    ({"data.interpolation": "bicubc"}, "data.interpolation='bicubc' is not an interpolation. "
                                       "Did you mean: bicubic"),
    ({"data.image_ops": "tf"}, "data.interpolation='bilinear': data.image_ops='tf' resizes "
                               "bicubically"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0 must be in [0, 1)"),
    ({"label_smoothing": -0.1}, "label_smoothing=-0.1 must be in [0, 1)"),
    ({"data.mixup_alpha": -0.2}, "data.mixup_alpha=-0.2 must be >= 0"),
    ({"ema_decay": 1.0}, "ema_decay=1.0 must be in [0, 1)"),
    ({"ema_decay": -0.5}, "ema_decay=-0.5 must be in [0, 1)"),
]


@pytest.mark.parametrize("overrides,line", BAD, ids=[line.split("=")[0] for _, line in BAD])
def test_a_bad_value_is_one_line_naming_the_field(overrides, line):
    found = config_checks.problems(config_with(**overrides), num_devices=1)
    assert len(found) == 1, found
    assert found[0].startswith(f"config.{line}"), found


def test_every_problem_is_reported_at_once():
    config = config_with(**{
        "batch_size": 0, "log_every": 0, "checkpoint_every": 0, "keep_checkpoints": 0,
        "optimizer.name": "adamw", "optimizer.schedule": "cosin", "optimizer.base_lr": -1.0,
        "optimizer.momentum": 1.0, "optimizer.warmup_epochs": 20.0, "compute_dtype": "float16",
        "data.eval_preprocess": "center_crop", "data.interpolation": "area",
        "label_smoothing": 1.5, "data.mixup_alpha": -1.0, "ema_decay": 1.0})
    found = config_checks.problems(config, num_devices=1)
    assert [line.split("=")[0] for line in found] == [f"config.{field}" for field in (
        "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "optimizer.name",
        "optimizer.schedule", "optimizer.base_lr", "optimizer.momentum",
        "optimizer.warmup_epochs", "compute_dtype", "data.eval_preprocess",
        "data.interpolation", "data.mixup_alpha", "label_smoothing", "ema_decay")], found


def test_batches_must_be_multiples_of_the_devices():
    found = config_checks.problems(config_with(batch_size=6, eval_batch_size=10), num_devices=4)
    assert found == [
        "config.batch_size=6 must be a multiple of the 4 devices the batch is sharded over",
        "config.eval_batch_size=10 must be a multiple of the 4 devices the batch is sharded over"]


def test_a_warm_up_may_outlast_a_run_of_num_steps():
    # num_steps overrides num_epochs: a short run of a recipe (a smoke test) keeps its warm-up.
    config = config_with(**{"num_steps": 12, "optimizer.warmup_epochs": 100.0})
    assert config_checks.problems(config, num_devices=1) == []


def test_a_step_must_fit_in_the_train_split():
    config = config_with(batch_size=1024)
    assert config_checks.train_split_problems(config, DIGITS_TRAIN_EXAMPLES) == []
    config.data.mixup_alpha = 0.2
    assert config_checks.train_split_problems(config, DIGITS_TRAIN_EXAMPLES) == [
        "config.batch_size=1024: a step reads 2048 examples (the global batch x 2 to mix), "
        "more than the 1437 of sklearn_digits:train"]


def _image_folder(root, n):
    for i in range(n):   # never read: the size of a split is its file listing
        path = root / "train" / ("a" if i % 2 else "b") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return root


def test_validate_raises_every_problem_as_one_config_error(tmp_path):
    config = config_with(**{"task": "clasification", "model": "resnet19", "log_every": 0,
                            "data.data_dir": str(tmp_path)})
    with pytest.raises(loop.ConfigError) as error:
        loop._validate(config, types.SimpleNamespace(size=1))
    lines = str(error.value).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("config.task: unknown task 'clasification'")
    assert lines[1].startswith("config.model: unknown model 'resnet19'")
    assert lines[2].startswith("config.log_every=0 must be positive")


def test_validate_checks_the_batch_against_the_train_split(tmp_path):
    mesh = types.SimpleNamespace(size=1)
    config = config_with(**{"data.name": "image_folder", "batch_size": 8,
                            "data.data_dir": str(_image_folder(tmp_path, 6))})
    with pytest.raises(loop.ConfigError, match=r"^config.batch_size=8: a step reads 8 examples "
                                               r"\(the global batch\), more than the 6 of "
                                               r"image_folder:train$"):
        loop._validate(config, mesh)
    config.batch_size = 6
    assert loop._validate(config, mesh).name == "classification"
    # A dataset that is not there is left to the opening of the data, which says how to get it.
    config.data.update(name="imagenet2012", num_classes=1000, data_dir=str(tmp_path / "none"))
    assert loop._validate(config, mesh).name == "classification"


def _steps(tx, grads, params):
    state, out = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, out)
        out = optax.apply_updates(out, updates)
    return out


def test_sgd_agc_honours_nesterov(monkeypatch):
    params = {"w": np.ones((3, 4), np.float32)}
    grads = [{"w": np.full((3, 4), v, np.float32)} for v in (1e-3, -2e-3, 3e-3)]
    roles, no_clip = {"w": "weight"}, dict(clipping=1e6, weight_decay=0.0, decay_roles=(),
                                           classifier_roles=("classifier_weight",
                                                             "classifier_bias"))
    for nesterov in (True, False):
        tx = optim.nfnet_optimizer(roles, 0.1, momentum=0.9, nesterov=nesterov, **no_clip)
        expected = _steps(optax.sgd(0.1, momentum=0.9, nesterov=nesterov), grads, params)
        np.testing.assert_allclose(_steps(tx, grads, params)["w"], expected["w"], rtol=1e-6)
    # ... and the config's flag reaches it.
    seen = []

    def nfnet_optimizer(*args, **kwargs):
        seen.append(kwargs["nesterov"])
        return optax.identity()

    model = nets.transformed("resnet18", num_classes=10)
    shapes, _ = jax.eval_shape(
        lambda key: model.init(key, np.zeros((1, 32, 32, 3), np.float32), is_training=True),
        jax.random.key(0))
    cfg = common.base().optimizer
    cfg.name = "sgd_agc"
    monkeypatch.setattr(optim, "nfnet_optimizer", nfnet_optimizer)
    for nesterov in (False, True):
        cfg.nesterov = nesterov
        optimizers.optimizer(cfg, "resnet18", shapes, 0.1)
    assert seen == [False, True]


def test_train_py_prints_each_problem_and_exits_2_before_building_anything(tmp_path):
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "train.py", "--config.checkpoint_every=0", "--config.log_every=0",
         "--config.optimizer.name=adamw", "--config.compute_dtype=float16",
         "--config.keep_checkpoints=-1", f"--workdir={workdir}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py:")]
    assert [line.split("=")[0] for line in lines] == [
        "train.py: error: config.log_every", "train.py: error: config.checkpoint_every",
        "train.py: error: config.keep_checkpoints", "train.py: error: config.optimizer.name",
        "train.py: error: config.compute_dtype"], result.stderr
    # Nothing built: no workdir, no "training ..." line; the time is the imports'.
    assert not workdir.exists() and result.stdout == ""
    print(f"train.py refused the config in {seconds:.1f} s")
