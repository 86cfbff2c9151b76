"""Tasks (training/tasks.py): config.task picks one; the loop, the step builder, the reporter and
train.py are task-free, so a task's words reach the output only through its Task record."""

import json
import pathlib
import re

import numpy as np
import pytest

from experiments import common
from training import classification, distill, loop, metrics, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_config_task_picks_the_task_module():
    assert tasks.get("classification") is classification.TASK
    assert tasks.get("distillation") is distill.TASK
    # Distillation is classification with another objective: the same data, eval and reports.
    same = ("train_data", "num_train_examples", "eval_data", "eval_sums", "summarize",
            "train_line", "eval_line", "final_line")
    assert all(getattr(distill.TASK, f) is getattr(classification.TASK, f) for f in same)
    assert distill.TASK.objective is not classification.TASK.objective
    assert common.base().task == "classification"


def test_an_unknown_task_is_a_config_error_before_any_data(tmp_path):
    config = common.base()
    config.model, config.task = "resnet18", "clasification"
    config.data.data_dir = str(tmp_path)   # no dataset there: the config error comes first
    with pytest.raises(loop.ConfigError, match=r"config.task: unknown task 'clasification'. "
                                               r"Did you mean: classification"):
        loop.run(config, str(tmp_path / "run"))


# The words of one task, to find in the output of task-free code.
STUB = tasks.Task(name="stub", validate=None, objective=None, train_data=None,
                  num_train_examples=None, eval_data=None,
                  eval_sums=None, summarize=None,
                  train_line=lambda means: f"stub-train {means['hits']:.2f}",
                  eval_line=lambda result: f"stub-eval {result['score']:.3f}",
                  final_line=lambda label, result: f"stub-final {label}")


def test_the_reporter_prints_the_task_words_and_writes_every_scalar(tmp_path, capsys):
    report = metrics.Reporter(str(tmp_path), 4, 2.0, 8, STUB)
    report.start(0)
    report.train(2, [{"loss": np.float32(1.0), "hits": np.float32(0.25), "lr": np.float32(0.1)},
                     {"loss": np.float32(3.0), "hits": np.float32(0.75), "lr": np.float32(0.1)}])
    report.eval(2, loop.Evaluation({"score": 0.5, "count": 6.0}, {"score": 0.25, "count": 6.0}))
    report.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step 2/4 | epoch 1.00 | loss 2.0000 | stub-train 0.50 | lr 0.1")
    assert out[1:] == ["eval at step 2 (params, 6 images): stub-eval 0.500",
                       "eval at step 2 (EMA params, 6 images): stub-eval 0.250"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["train/hits"] == 0.5 and records[0]["train/loss"] == 2.0
    assert records[1] == {"step": 2, "eval/score": 0.5, "eval_ema/score": 0.25}


def test_evaluation_reports_the_ema_where_there_is_one():
    both = loop.Evaluation({"score": 1.0}, {"score": 2.0})
    assert both.final() == ("EMA params", {"score": 2.0})
    assert loop.Evaluation({"score": 1.0}, None).final() == ("params", {"score": 1.0})
    assert list(loop.Evaluation({"score": 1.0}, None).named()) == ["eval"]


@pytest.mark.parametrize("path", ["train.py", "training/loop.py", "training/steps.py",
                                  "training/metrics.py", "training/checkpoint.py"])
def test_task_free_code_names_no_task_metric(path):
    source = (ROOT / path).read_text()
    assert not re.findall(r"top-?[15]|labels|cross_entropy|teacher|classif", source)
