"""train.py distilling from a teacher's weights file (nets.weights), end to end on the built-in
dataset: the loss is its two logged terms combined and the checkpoint holds the student alone.
(A teacher from a run's workdir goes through the same reader as fine-tuning's init_from, run
end to end in tests/test_train.py.)"""

import json

import jax
import numpy as np
import pytest

import data
import nets
from tests.helpers import random_variables
from tests.test_train import run_experiment, saved_tree


def test_distillation_from_a_weights_file(tmp_path):
    data_dir = tmp_path / "tfds"
    data.prepare_builtin(str(data_dir))
    teacher = tmp_path / "resnet18.safetensors"
    f = nets.transformed("resnet18", 10)
    params, state = random_variables(f, nets.introspect.example_images("resnet18", 1, 32))
    nets.weights.save(teacher, params, state, model="resnet18")
    workdir = tmp_path / "run"
    result = run_experiment("experiments/distill_mobilenet_v2.py:local", workdir, data_dir,
                            "--config.model=mobilenet_v1_025", "--config.distill.teacher=",
                            f"--config.distill.teacher_from={teacher}",
                            "--config.distill.teacher_ema=False", "--config.num_steps=2",
                            "--config.ema_decay=0", size=32)   # MobileNet's stride is 32
    assert (f"distilling from resnet18 weights {teacher} (eval mode): loss = 0.5 * CE + 0.5 * "
            "4.0^2 * KL") in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
               if '"train/loss"' in line]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:   # one step per record (log_every=1): the loss is its two terms combined
        assert r["train/ce"] > 0 and r["train/kl"] > 0
        assert r["train/loss"] == pytest.approx(0.5 * r["train/ce"] + 0.5 * 16 * r["train/kl"],
                                                rel=1e-5)
    # The checkpoint holds the student alone.
    saved = saved_tree(workdir, 2)
    student = nets.introspect.shapes("mobilenet_v1_025", 10)[0]
    assert sum(v.size for k, v in saved.items() if k.startswith("params/")) == sum(
        int(np.prod(s.shape)) for s in jax.tree.leaves(student))
