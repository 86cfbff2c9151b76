"""detection/coco_metric.py: the [N, 7] detection rows, the in-memory ground truth and the COCO
stats through pycocotools, on hand-built cases whose AP is worked out by hand (no model)."""

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import detection
from detection.postprocess import Detections


def _metrics(gt, rows, **kw):
    pytest.importorskip("pycocotools")
    return detection.coco_metrics(gt, rows, **kw)


# Three images, two categories, small (20x20 = 400 < 32^2), medium (50x60 = 3000 < 96^2) and
# large (100x120) objects, padding rows (label -1).
PERFECT_IDS = np.array([7, 42, 1000])
PERFECT_BOXES = np.array([
    [[10, 10, 30, 30], [40, 50, 90, 110], [0, 0, 0, 0]],
    [[0, 0, 100, 120], [200, 200, 220, 220], [5, 5, 55, 65]],
    [[50, 60, 150, 180], [0, 0, 0, 0], [0, 0, 0, 0]],
], np.float32)
PERFECT_LABELS = np.array([[1, 3, -1], [3, 1, 1], [1, -1, -1]])


def test_perfect_detections_score_one():
    gt = detection.ground_truth_dict(PERFECT_IDS, [[480, 640]] * 3, PERFECT_BOXES,
                                     PERFECT_LABELS)
    valid = PERFECT_LABELS >= 0
    rows = detection.detections_to_coco(PERFECT_IDS, PERFECT_BOXES, np.ones(valid.shape),
                                        np.where(valid, PERFECT_LABELS, 0), valid)
    m = _metrics(gt, rows)
    assert list(m) == list(detection.COCO_METRIC_NAMES)
    assert all(isinstance(v, float) for v in m.values())
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax10", "ARmax100", "ARs", "ARm",
                 "ARl"):
        assert m[name] == pytest.approx(1.0, abs=1e-12), name  # a mean of 1.0s
    # AR@1 keeps one detection per (image, category): category 1 has 4 objects, 2 of them in
    # image 42, so 3 of 4 are found; category 3 finds 2 of 2: AR@1 = (3/4 + 1) / 2.
    assert m["ARmax1"] == pytest.approx(0.875, abs=1e-12)


def _hand_built():
    # Category 1 only, all boxes 100 x 100 (area 10000 > 96^2: "large").
    # Image 1: gt A = [0, 0, 100, 100], gt B = [200, 200, 300, 300]. Image 2: gt C, no detection.
    ids = np.array([1, 2])
    gt_boxes = np.array([[[0, 0, 100, 100], [200, 200, 300, 300]],
                         [[0, 0, 100, 100], [0, 0, 0, 0]]], np.float32)
    gt = detection.ground_truth_dict(ids, None, gt_boxes, [[1, 1], [1, -1]])
    det_boxes = np.array([[
        [0, 0, 100, 100],      # 0.9: A exactly -> TP
        [200, 240, 300, 340],  # 0.8: IoU with B = 6000 / 14000 = 0.43 -> FP at every threshold
        [200, 200, 300, 300],  # 0.7: B exactly -> TP
        [0, 10, 100, 110],     # 0.6: IoU 0.82 with A, already matched: duplicate -> FP
    ], [[0, 0, 0, 0]] * 4], np.float32)
    scores = np.array([[0.9, 0.8, 0.7, 0.6], [0.0] * 4])
    classes = np.array([[1, 1, 1, 1], [0] * 4])
    valid = np.array([[True] * 4, [False] * 4])
    return gt, detection.detections_to_coco(ids, det_boxes, scores, classes, valid)


def test_hand_built_ap50_from_the_101_point_interpolation():
    # Detections by score: TP, FP, TP, FP over 3 ground-truth objects (C in image 2 is missed).
    #   cumulative TP 1 1 2 2, FP 0 1 1 2 -> recall 1/3 1/3 2/3 2/3, precision 1 1/2 2/3 1/2.
    #   COCO makes precision non-increasing from the right: 1 2/3 2/3 1/2, and reads it at
    #   the 101 recall thresholds r = 0, .01, ..., 1 at the first detection with recall >= r:
    #   r in 0 .. .33   (34 thresholds, r <= 1/3): precision 1
    #   r in .34 .. .66 (33 thresholds, r <= 2/3): precision 2/3
    #   r in .67 .. 1   (34 thresholds): recall never reached, 0.
    #   AP50 = (34 * 1 + 33 * 2/3 + 34 * 0) / 101 = 56 / 101.
    # Every hit is exact and every miss misses at every IoU threshold, so AP = AP75 = AP50.
    gt, rows = _hand_built()
    m = _metrics(gt, rows)
    assert m["AP50"] == pytest.approx(56 / 101, abs=1e-12)
    assert m["AP"] == pytest.approx(56 / 101, abs=1e-12)
    assert m["AP75"] == pytest.approx(56 / 101, abs=1e-12)
    assert m["ARmax100"] == pytest.approx(2 / 3)
    # No small or medium objects: pycocotools' -1 ("nothing to measure") is kept.
    assert m["APs"] == m["APm"] == m["ARs"] == m["ARm"] == -1.0
    assert m["APl"] == m["AP"]


def test_image_ids_restrict_the_evaluation():
    # Image 1 alone: 2 objects -> recall 1/2 1/2 1 1, envelope precision 1 2/3 2/3 1/2:
    #   r in 0 .. .50 (51 thresholds): 1; r in .51 .. 1 (50 thresholds): 2/3.
    #   AP50 = (51 + 50 * 2/3) / 101 = 253 / 303.
    gt, rows = _hand_built()
    m = _metrics(gt, rows, image_ids=[1])
    assert m["AP50"] == pytest.approx(253 / 303, abs=1e-12)
    assert m["ARmax100"] == 1.0
    with pytest.raises(ValueError, match="not in the ground truth"):
        _metrics(gt, rows, image_ids=[1, 3])
    with pytest.raises(ValueError, match="no images"):
        _metrics(gt, rows, image_ids=[])


def test_crowd_box_matched_by_a_detection_is_ignored():
    # Image 1: gt A = [0, 0, 50, 50] and a crowd region C = [100, 100, 300, 300], category 1.
    # Two detections inside C score above the hit on A. Crowd: they match C (IoU against a
    # crowd box is intersection / detection area = 1) and are ignored, C is not an object to
    # find: AP 1. Not crowd: they are FPs (IoU 2500/40000 and 3600/40000 with C) ranked first
    # and C is a missed object: recall 1/2 at precision 1/3, so AP50 = 51 * (1/3) / 101 = 17/101.
    boxes = np.array([[[0, 0, 50, 50], [100, 100, 300, 300]]], np.float32)
    det_boxes = np.array([[[150, 150, 200, 200], [120, 120, 180, 180], [0, 0, 50, 50]]],
                         np.float32)
    rows = detection.detections_to_coco([1], det_boxes, [[0.95, 0.9, 0.8]], [[1, 1, 1]],
                                        [[True] * 3])
    crowd = detection.ground_truth_dict([1], None, boxes, [[1, 1]], is_crowd=[[0, 1]])
    m = _metrics(crowd, rows)
    assert [m["AP"], m["AP50"], m["AP75"]] == pytest.approx([1.0] * 3, abs=1e-12)
    plain = detection.ground_truth_dict([1], None, boxes, [[1, 1]])
    assert _metrics(plain, rows)["AP50"] == pytest.approx(17 / 101, abs=1e-12)


def test_detections_to_coco_rows_and_round_trip():
    boxes = np.array([[[10, 20, 50, 80], [0, 0, 0, 0]],
                      [[1.5, 2.5, 3.5, 4.75], [5, 6, 7, 9]]], np.float32)
    scores = np.array([[0.9, 0.0], [0.8, 0.7]], np.float32)
    classes = np.array([[3, 0], [1, 90]], np.int32)
    valid = np.array([[True, False], [True, True]])
    rows = detection.detections_to_coco(np.array([5, 6]), boxes, scores, classes, valid)
    assert rows.shape == (3, 7) and rows.dtype == np.float64
    np.testing.assert_allclose(rows, [[5, 20, 10, 60, 40, 0.9, 3],
                                      [6, 2.5, 1.5, 2.25, 2, 0.8, 1],
                                      [6, 6, 5, 3, 2, 0.7, 90]], rtol=1e-6)
    # xywh back to yxyx gives the valid input boxes.
    x, y, w, h = rows[:, 1:5].T
    np.testing.assert_allclose(np.stack([y, x, y + h, x + w], -1), boxes[valid])
    # A Detections record (JAX arrays) goes straight in.
    d = Detections(jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes),
                   jnp.asarray(valid), jnp.sum(jnp.asarray(valid), -1))
    np.testing.assert_allclose(
        detection.detections_to_coco(jnp.array([5, 6]), d.boxes, d.scores, d.classes, d.valid),
        rows)
    assert detection.detections_to_coco([5, 6], boxes, scores, classes).shape == (4, 7)
    assert detection.detections_to_coco([5, 6], boxes, scores, classes,
                                        np.zeros((2, 2), bool)).shape == (0, 7)
    with pytest.raises(ValueError, match="image_ids"):
        detection.detections_to_coco([5], boxes, scores, classes, valid)


def test_ground_truth_dict_areas_ids_and_categories():
    gt = detection.ground_truth_dict(
        [11, 12], [[480, 640], [100, 200]],
        np.array([[[10, 20, 50, 80], [0, 0, 0, 0]], [[1.5, 2.5, 3.5, 4.75], [5, 6, 7, 9]]]),
        [[3, -1], [1, 3]], is_crowd=[[False, False], [False, True]])
    assert gt["images"] == [{"id": 11, "height": 480, "width": 640},
                            {"id": 12, "height": 100, "width": 200}]
    anns = gt["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3]
    assert [a["image_id"] for a in anns] == [11, 12, 12]
    assert [a["category_id"] for a in anns] == [3, 1, 3]
    assert [a["bbox"] for a in anns] == [[20, 10, 60, 40], [2.5, 1.5, 2.25, 2], [6, 5, 3, 2]]
    assert [a["area"] for a in anns] == [2400, 4.5, 6]
    assert [a["iscrowd"] for a in anns] == [0, 0, 1]
    assert gt["categories"] == [{"id": 1, "name": "1"}, {"id": 3, "name": "3"}]
    json.dumps(gt)  # plain Python numbers
    cats = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 5, "name": "bus"}]
    assert detection.ground_truth_dict([1], None, [[[0, 0, 1, 1]]], [[3]],
                                       categories=cats)["categories"] == cats
    with pytest.raises(ValueError, match=r"\[3\] are not among"):
        detection.ground_truth_dict([1], None, [[[0, 0, 1, 1]]], [[3]], categories=cats[:1])
    # An image without objects is still listed (its images count in the evaluation).
    empty = detection.ground_truth_dict([4], None, np.zeros((1, 2, 4)), [[-1, -1]])
    assert empty["images"] == [{"id": 4}] and empty["annotations"] == []


def test_empty_detections_score_zero():
    gt = detection.ground_truth_dict(PERFECT_IDS, None, PERFECT_BOXES, PERFECT_LABELS)
    rows = detection.detections_to_coco(PERFECT_IDS, PERFECT_BOXES, np.ones((3, 3)),
                                        np.ones((3, 3)), np.zeros((3, 3), bool))
    assert rows.shape == (0, 7)
    m = _metrics(gt, rows)
    assert all(v == 0.0 for v in m.values()), m
    assert _metrics(gt, np.zeros((0,)))["AP"] == 0.0


def test_json_file_same_as_dict_quiet_and_unmutated(tmp_path, capsys):
    gt, rows = _hand_built()
    before = json.dumps(gt)
    path = tmp_path / "instances.json"
    path.write_text(before)
    from_dict = _metrics(gt, rows)
    assert _metrics(path, rows) == from_dict
    assert _metrics(str(path), rows) == from_dict
    assert json.dumps(gt) == before  # COCOeval's "ignore" keys went to copies
    assert capsys.readouterr().out == ""  # pycocotools' printing captured


def test_unknown_categories_and_images_are_errors():
    gt, rows = _hand_built()
    padded = rows.copy()
    padded[1, 6] = 0  # an official padding row (class 0) left in
    with pytest.raises(ValueError, match=r"unknown category ids \[0\]"):
        _metrics(gt, padded)
    stray = rows.copy()
    stray[0, 0] = 99
    with pytest.raises(ValueError, match="images not in the ground truth"):
        _metrics(gt, stray)
    with pytest.raises(ValueError, match=r"\[N, 7\]"):
        _metrics(gt, rows[:, :6])


def test_pycocotools_is_imported_lazily_with_a_clear_error(monkeypatch):
    out = subprocess.run([sys.executable, "-c", "import sys, detection; "
                          "print(any(m.startswith('pycocotools') for m in sys.modules))"],
                         capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "False"
    for name in ("pycocotools", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)
    gt, rows = _hand_built()
    with pytest.raises(ImportError, match="pip install pycocotools"):
        detection.coco_metrics(gt, rows)
