"""The keypoint task (training/keypoints.py, issue 21): its matching metric on hand-made
predictions, its config checks, and a short run of a reduced point model on the built-in
dataset through the trainer."""

import json

import numpy as np
import pytest

from experiments import efficientdet_d0_keypoints
from training import keypoints, loop, tasks

# Two images; ground truth in original pixels, classes 0-based, -1 pads.
TRUTH_POINTS = np.array([[[10.0, 10.0], [50.0, 80.0], [0.0, 0.0]],
                         [[30.0, 30.0], [0.0, 0.0], [0.0, 0.0]]], np.float32)
TRUTH_CLASSES = np.array([[3, 7, -1], [1, -1, -1]], np.int32)


def outputs(points, classes, scores=None, mask=(True, True)):
    """One collected batch of `eval_outputs`, predictions [2, K, ...] (class -1: none)."""
    points = np.asarray(points, np.float32)
    classes = np.asarray(classes, np.int32)
    valid = classes >= 0
    if scores is None:
        scores = np.where(valid, 0.9, 0.0)
    return {"image_ids": np.array([1, 2]), "mask": np.array(mask),
            "points": points, "scores": np.asarray(scores, np.float32), "classes": classes,
            "valid": valid & np.array(mask)[:, None], "truth_points": TRUTH_POINTS,
            "truth_classes": np.where(np.array(mask)[:, None], TRUTH_CLASSES, -1)}


def test_perfect_predictions_find_every_point_with_no_error():
    result = keypoints.summarize([outputs(TRUTH_POINTS, TRUTH_CLASSES)])
    assert result == {"recall_2px": 1.0, "precision_2px": 1.0, "recall_4px": 1.0,
                      "precision_4px": 1.0, "error_px": 0.0, "points": 3.0,
                      "predictions": 3.0, "count": 2.0}


def test_a_point_beyond_the_radius_or_of_another_class_is_missed():
    points = TRUTH_POINTS.copy()
    points[0, 0] += (3.0, 0.0)       # 3 px off: found within 4 px, missed within 2 px
    points[0, 1] += (3.0, 4.0)       # 5 px off: missed at both radii
    classes = TRUTH_CLASSES.copy()
    classes[1, 0] = 2                 # on the spot, but another class
    result = keypoints.summarize([outputs(points, classes)])
    assert result["recall_2px"] == 0.0 and result["precision_2px"] == 0.0
    assert result["recall_4px"] == pytest.approx(1 / 3)
    assert result["precision_4px"] == pytest.approx(1 / 3)
    assert result["error_px"] == pytest.approx(3.0)
    # batches are concatenated; a masked image counts for nothing
    both = keypoints.summarize([outputs(points, classes, mask=(True, False)),
                                outputs(TRUTH_POINTS, TRUTH_CLASSES)])
    assert both["count"] == 3.0 and both["points"] == 5.0
    assert both["recall_4px"] == pytest.approx(4 / 5)


def test_matching_is_one_to_one_and_greedy_by_score():
    # two predictions near one ground-truth point: the higher-scored one is matched, even
    # though the other is nearer; the other is a false positive
    truth = np.array([[0.0, 0.0]])
    pred, found, dist = keypoints.match(np.array([[0.5, 0.0], [1.5, 0.0]]), np.array([0.4, 0.8]),
                                        np.array([0, 0]), truth, np.array([0]), 2.0)
    assert pred.tolist() == [1] and found.tolist() == [0] and dist.tolist() == [1.5]
    # one prediction between two points takes the nearer; the other point stays unmatched
    pred, found, dist = keypoints.match(np.array([[0.0, 1.0]]), np.array([0.9]), np.array([0]),
                                        np.array([[0.0, 0.0], [0.0, 1.5]]), np.array([0, 0]),
                                        2.0)
    assert found.tolist() == [1] and dist.tolist() == [0.5]
    empty = keypoints.match(np.zeros((0, 2)), np.zeros(0), np.zeros(0, int), truth,
                            np.array([0]), 2.0)
    assert all(len(a) == 0 for a in empty)


def test_the_pipeline_labels_become_zero_based_classes():
    assert keypoints.classes_of(np.array([1, 10, -1])).tolist() == [0, 9, -1]


def test_the_task_takes_point_models_only():
    config = efficientdet_d0_keypoints.get_config("local")
    assert tasks.get("keypoints") is keypoints.TASK and config.task == "keypoints"
    keypoints.validate(config)
    config.model = "efficientdet_d0"
    with pytest.raises(ValueError, match="config.task='keypoints' trains point heads "
                                         r"\(efficientdet_d0_keypoints\); efficientdet_d0 is "
                                         "a detection model"):
        keypoints.validate(config)


@pytest.fixture(scope="module")
def digits_dir(detection_data_dir):
    return detection_data_dir


def test_a_short_run_reports_the_keypoint_metrics(digits_dir, tmp_path, monkeypatch, capsys):
    """3 steps of a reduced point model (B0 at width and depth 0.25, BiFPN 16 wide, one cell,
    one head repeat) at 64 px: finite losses, and the metrics in its results and logs."""
    monkeypatch.setenv("NETS_CONV_LOWERING", "native")   # faster XLA:CPU compiles
    config = efficientdet_d0_keypoints.get_config("local")
    config.data.data_dir = digits_dir
    config.data.update(dict(train_size=64, test_size=64))
    config.model_kwargs.update(dict(backbone=(0.25, 0.25), fpn_width=16, fpn_cells=1,
                                    head_repeats=1))
    config.update(dict(batch_size=4, eval_batch_size=100, num_steps=3, log_every=1))
    workdir = tmp_path / "run"
    results = loop.run(config, str(workdir))
    assert results.step == 3
    label, final = results.evaluation.final()
    assert label == "EMA params" and final["count"] == 300.0
    for result in (results.evaluation.params, results.evaluation.ema):
        assert set(result) == {"recall_2px", "precision_2px", "recall_4px", "precision_4px",
                               "error_px", "points", "predictions", "count"}
        assert all(np.isfinite(v) for v in result.values())
        assert result["points"] == 780.0   # the test split's digits
    assert results.final_line.startswith("test keypoints (EMA params): recall@4px ")
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for r in train:
        assert np.isfinite(r["train/loss"]) and r["train/points"] > 0
        assert r["train/loss"] == pytest.approx(r["train/presence_loss"]
                                                + r["train/offset_loss"], rel=1e-5)
    assert "eval/recall_4px" in records[-1] and "eval_ema/error_px" in records[-1]
    out = capsys.readouterr().out
    assert "| presence " in out and "recall@2px" in out
