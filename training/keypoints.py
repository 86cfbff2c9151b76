"""The keypoint task (issue 21): the design notes' anchor-free point head (efficientdet_spec.md
§18, `detection.keypoints`) trained on a detection dataset's points, evaluated by how many of
the ground-truth points it finds within a few pixels.

Data: data/detection.py's pipeline, as the detection task reads it; the source must have points
(the built-in sklearn_digits_detection has one per digit, its box centre). Train batches carry
"points" [b, G, 2] (y, x) input px and "labels" [b, G] (>= 1, -1 pads); the targets are encoded
inside the jitted step (`detection.encode_batch`, classes label - 1, on the levels the model's
registry row names), and the loss (`detection.keypoint_loss`: focal presence + offset) is
normalised by the global batch's encoded points + 1 (the step sees the global batch).

Evaluation: `detection.decode_keypoints` per image (its defaults: score >= 0.3, 3x3 peaks, the
best 100), points scaled to original pixels, collected on the host; then for each radius
R in RADII_PX, predictions and ground-truth points of one image are matched one-to-one, greedily
by score: in descending score order each prediction takes the nearest still unmatched
ground-truth point of its class within R px (Euclidean, original pixels; ties to the earlier
point). Reported:
- recall_{R}px: matched ground-truth points / ground-truth points;
- precision_{R}px: matched predictions / predictions;
- error_px: the mean distance of the matched pairs at the largest radius;
- points, predictions: the totals; count: images evaluated.
Ground truth is every non-crowd object of the eval example (the first data.max_boxes); a ratio
with an empty denominator is reported as 0.
"""

from __future__ import annotations

import haiku as hk
import jax.numpy as jnp
import numpy as np

import detection
import nets
from data import detection as detection_data
from training import detection as detection_task
from training import steps
from training.tasks import Task

# Match radii, original-image pixels; error_px is measured on the matches at the largest.
RADII_PX = (2.0, 4.0)


def head(config) -> tuple[tuple[int, ...], tuple[float, ...], int]:
    """The model's point levels (its registry row's task_metadata "levels"): their indices in
    the model's per-level outputs (which start at min_level 3), their strides, and the points
    per cell (config.model_kwargs may override it)."""
    meta = nets.model_info(config.model).task_metadata
    min_level = config.model_kwargs.get("min_level", meta["min_level"])
    levels = tuple(meta["levels"])
    points_per_cell = int(config.model_kwargs.get("points_per_cell", meta["points_per_cell"]))
    return (tuple(level - min_level for level in levels),
            tuple(float(2 ** level) for level in levels), points_per_cell)


def classes_of(labels):
    """The pipeline's labels (>= 1, -1 pads) -> detection.keypoints' classes (0-based, -1)."""
    return jnp.where(labels >= 1, labels - 1, -1)


def objective(model: hk.TransformedWithState, indices, strides, points_per_cell: int,
              num_classes: int, *, dtype):
    """The loss `steps.Objective` wants: `detection.keypoint_loss` of the training-mode forward
    on the levels `indices` (strides `strides`) against targets encoded here, on the device,
    from batch["points"] / ["labels"], normalised by the batch's encoded points + 1."""

    def loss(params, model_state, rng, batch, extra=None):
        out, model_state = model.apply(params, model_state, rng,
                                       batch["images"].astype(dtype), is_training=True)
        class_outputs = [out["class"][i] for i in indices]
        point_outputs = [out["point"][i] for i in indices]
        targets = detection.encode_batch(
            batch["points"], classes_of(batch["labels"]),
            [tuple(c.shape[1:3]) for c in class_outputs], strides, points_per_cell,
            num_classes)
        encoded = sum(jnp.sum(t.num_points) for t in targets)
        losses = detection.keypoint_loss(class_outputs, point_outputs, targets, points_per_cell,
                                         detection.loss_normalizer(encoded))
        images = batch["images"].shape[0]
        metrics = {"presence_loss": losses.presence, "offset_loss": losses.offset,
                   "points": encoded / images,
                   "dropped": sum(jnp.sum(t.num_dropped) for t in targets) / images}
        return losses.total, (model_state, metrics)

    return loss


def validate(config) -> None:
    if not detection_task.check_model_task(config, "keypoints", "point heads"):
        return
    problems = detection_task.data_problems(config)
    if problems:
        raise ValueError("\n".join(problems))


def _objective(config, model, *, dtype) -> steps.Objective:
    indices, strides, points_per_cell = head(config)
    loss = objective(model, indices, strides, points_per_cell, config.data.num_classes,
                     dtype=dtype)
    return steps.Objective(loss)


def _check_points(cfg, split: str) -> None:
    if not detection_data.open_source(cfg, split).has_points:
        raise detection_data.DetectionDataError(
            f"{cfg.name}:{split} has no points (objects' 'point' feature); the keypoint task "
            "needs them (the built-in sklearn_digits_detection has one per digit)")


def train_data(config, *, process_index: int, process_count: int):
    _check_points(config.data, config.data.train_split)
    return detection_data.train_iterator(config.data, global_batch=config.batch_size,
                                         seed=config.seed, process_index=process_index,
                                         process_count=process_count)


def eval_data(config, *, process_index: int, process_count: int):
    _check_points(config.data, config.data.eval_split)
    return detection_data.eval_batches(config.data, global_batch=config.eval_batch_size,
                                       process_index=process_index, process_count=process_count)


def eval_outputs(model: hk.TransformedWithState, indices, strides, points_per_cell: int):
    """(params, model_state, batch) -> the batch's decoded points in original pixels (through
    batch["scales"]) with scores, classes and valid (False on masked examples), and its ground
    truth: "truth_points", "truth_classes" (0-based; -1 for padding, crowd objects and masked
    examples). Runs in float32."""

    def outputs(params, model_state, batch):
        out, _ = model.apply(params, model_state, None, batch["images"], is_training=False)
        found = detection.decode_keypoints(
            [out["class"][i] for i in indices], [out["point"][i] for i in indices], strides,
            points_per_cell)
        mask = batch["mask"]
        truth = (batch["labels"] >= 1) & ~batch["is_crowd"] & mask[:, None]
        return {"image_ids": batch["image_ids"], "mask": mask,
                "points": found.points * batch["scales"][:, None, None],
                "scores": found.scores, "classes": found.classes,
                "valid": found.valid & mask[:, None],
                "truth_points": batch["points"],
                "truth_classes": jnp.where(truth, batch["labels"] - 1, -1)}

    return outputs


def _eval_outputs(config, model):
    indices, strides, points_per_cell = head(config)
    return eval_outputs(model, indices, strides, points_per_cell)


def match(points, scores, classes, truth_points, truth_classes, radius: float):
    """One image's greedy one-to-one matching: predictions (points [K, 2], scores [K], classes
    [K], all valid) in descending score order (stable), each to the nearest unmatched
    ground-truth point (truth_points [N, 2], truth_classes [N]) of its class within `radius`
    (ties: the earlier one). -> (prediction indices, truth indices, distances) of the pairs."""
    points, truth_points = np.asarray(points, np.float64), np.asarray(truth_points, np.float64)
    distance = np.linalg.norm(points[:, None] - truth_points[None], axis=-1)    # [K, N]
    allowed = (np.asarray(classes)[:, None] == np.asarray(truth_classes)[None]) & (
        distance <= radius)
    taken = np.zeros(len(truth_points), bool)
    pairs = []
    for k in np.argsort(-np.asarray(scores), kind="stable"):
        candidates = np.flatnonzero(allowed[k] & ~taken)
        if len(candidates):
            n = candidates[np.argmin(distance[k, candidates])]
            taken[n] = True
            pairs.append((k, n, distance[k, n]))
    pred, truth, dist = (np.array([p[i] for p in pairs]) for i in range(3))
    return pred.astype(int), truth.astype(int), dist.astype(np.float64)


def _ratio(a, b) -> float:
    return float(a) / float(b) if b else 0.0


def summarize(collected: list, config=None) -> dict:
    """The module docstring's metrics of the collected outputs (`eval_outputs`) over their
    unmasked images."""
    batches = detection_task.concatenate(collected)
    mask = batches["mask"].astype(bool)
    matched = dict.fromkeys(RADII_PX, 0)
    errors = []
    num_points = num_predictions = 0
    for i in np.flatnonzero(mask):
        valid = batches["valid"][i].astype(bool)
        truth = batches["truth_classes"][i] >= 0
        num_points += int(truth.sum())
        num_predictions += int(valid.sum())
        for radius in RADII_PX:
            _, _, dist = match(batches["points"][i][valid], batches["scores"][i][valid],
                               batches["classes"][i][valid], batches["truth_points"][i][truth],
                               batches["truth_classes"][i][truth], radius)
            matched[radius] += len(dist)
            if radius == max(RADII_PX):
                errors.extend(dist.tolist())
    result = {}
    for radius in RADII_PX:
        result[f"recall_{radius:g}px"] = _ratio(matched[radius], num_points)
        result[f"precision_{radius:g}px"] = _ratio(matched[radius], num_predictions)
    result["error_px"] = float(np.mean(errors)) if errors else 0.0
    result["points"], result["predictions"] = float(num_points), float(num_predictions)
    return {**result, "count": float(mask.sum())}


def train_line(means) -> str:
    return (f"presence {means['presence_loss']:.4f} | offset {means['offset_loss']:.4f} | "
            f"points/image {means['points']:.1f}")


def eval_line(result) -> str:
    radii = " | ".join(f"recall@{r:g}px {100 * result[f'recall_{r:g}px']:.2f} | "
                       f"precision@{r:g}px {100 * result[f'precision_{r:g}px']:.2f}"
                       for r in RADII_PX)
    return f"{radii} | error {result['error_px']:.2f} px"


def final_line(label: str, result) -> str:
    r = max(RADII_PX)
    return (f"test keypoints ({label}): recall@{r:g}px {100 * result[f'recall_{r:g}px']:.2f}, "
            f"precision@{r:g}px {100 * result[f'precision_{r:g}px']:.2f}, "
            f"error {result['error_px']:.2f} px")


TASK = Task(name="keypoints", validate=validate, objective=_objective, train_data=train_data,
            num_train_examples=detection_task.num_train_examples, eval_data=eval_data,
            eval_sums=_eval_outputs, summarize=summarize,
            train_line=train_line, eval_line=eval_line, final_line=final_line,
            eval_combine=detection_task.combine)
