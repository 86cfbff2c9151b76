"""The detection task (EfficientDet, ../shared/reference/efficientdet_spec.md §11-§14): anchor
targets assigned inside the jitted step from the batch's padded ground truth, focal + Huber
(+ IoU) loss normalised by the positives of the global batch, and evaluation by COCO mAP
(pycocotools) on the official post-processing's detections.

The step sees the global batch (sharded over the devices, one jitted program), so the loss
normaliser is the global batch's positives + 1 and BatchNorm statistics are over the global
batch; officially both are per replica with gradients averaged (a documented difference,
spec §19.6)."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

import detection
import nets
from data import detection as detection_data
from training import steps
from training.tasks import Task

NMS_METHODS = ("gaussian", "hard")
IOU_LOSSES = ("", "iou", "giou", "diou", "ciou")


def anchors(model: str, size: int) -> np.ndarray:
    """The anchors of the detector `model` at `size` px, in its flattened outputs' order."""
    meta = nets.model_info(model).task_metadata
    return detection.generate_anchors(size, meta["min_level"], meta["max_level"],
                                      meta["num_scales"], meta["aspect_ratios"],
                                      meta["anchor_scale"])


def objective(model: hk.TransformedWithState, anchors, num_classes: int, cfg, *, dtype,
              label_smoothing: float = 0.0):
    """The loss `steps.Objective` wants: `detection.detection_loss` of the training-mode
    forward against targets assigned here, on the device, from batch["boxes"] / ["labels"]
    (input pixels; labels >= 1, -1 for padding rows). `cfg`: a config's `detection`."""
    anchors = jnp.asarray(anchors, jnp.float32)

    def loss(params, model_state, rng, batch, extra=None):
        out, model_state = model.apply(params, model_state, rng,
                                       batch["images"].astype(dtype), is_training=True)
        targets = detection.assign_targets_batch(anchors, batch["boxes"], batch["labels"])
        losses = detection.detection_loss(
            out["class"], out["box"], targets, num_classes, alpha=cfg.focal_alpha,
            gamma=cfg.focal_gamma, delta=cfg.huber_delta, box_loss_weight=cfg.box_loss_weight,
            label_smoothing=label_smoothing, iou_loss_type=cfg.iou_loss_type or None,
            iou_loss_weight=cfg.iou_loss_weight, anchors=anchors)
        metrics = {"cls_loss": losses.cls, "box_loss": losses.box,
                   "positives": jnp.mean(targets.num_positives)}
        if cfg.iou_loss_type:
            metrics["iou_loss"] = losses.iou
        return losses.total, (model_state, metrics)

    return loss


def check_model_task(config, task: str, what: str) -> bool:
    """A ValueError unless config.model's registry task is `task` (listing the models that
    have it); False for an unknown model, which the loop reports."""
    try:
        info = nets.model_info(config.model)
    except ValueError:
        return False
    if info.task != task:
        models = ", ".join(n for n in nets.list_models() if nets.model_info(n).task == task)
        raise ValueError(f"config.task={task!r} trains {what} ({models}); {config.model} is a "
                         f"{info.task} model")
    return True


def data_problems(config) -> list[str]:
    """The detection pipeline's fields of config.data (data/detection.py) that cannot work."""
    problems = []
    if config.data.max_boxes < 1:
        problems.append(f"config.data.max_boxes={config.data.max_boxes} must be >= 1")
    if not 0 < config.data.scale_min <= config.data.scale_max:
        problems.append(f"config.data.scale_min={config.data.scale_min} and scale_max="
                        f"{config.data.scale_max}: need 0 < scale_min <= scale_max")
    if config.data.get("augment_on_device"):
        problems.append("config.data.augment_on_device=True: the detection pipeline prepares "
                        "whole batches on the host (data/detection.py); set it to False")
    return problems


def validate(config) -> None:
    if not check_model_task(config, "detection", "detectors"):
        return
    cfg = config.detection
    problems = data_problems(config)
    if cfg.nms not in NMS_METHODS:
        problems.append(f"config.detection.nms={cfg.nms!r}: expected one of "
                        f"{', '.join(NMS_METHODS)}")
    if cfg.iou_loss_type not in IOU_LOSSES:
        problems.append(f"config.detection.iou_loss_type={cfg.iou_loss_type!r}: expected one "
                        f"of {', '.join(map(repr, IOU_LOSSES))}")
    if problems:
        raise ValueError("\n".join(problems))


def _objective(config, model, *, dtype) -> steps.Objective:
    loss = objective(model, anchors(config.model, config.data.train_size), config.data.num_classes,
                     config.detection, dtype=dtype, label_smoothing=config.label_smoothing)
    return steps.Objective(loss)


def train_data(config, *, process_index: int, process_count: int):
    return detection_data.train_iterator(config.data, global_batch=config.batch_size,
                                         seed=config.seed, process_index=process_index,
                                         process_count=process_count)


def num_train_examples(config) -> int:
    return detection_data.num_train_examples(config.data)


def eval_data(config, *, process_index: int, process_count: int):
    return detection_data.eval_batches(config.data, global_batch=config.eval_batch_size,
                                       process_index=process_index, process_count=process_count)


def detections_fn(model: hk.TransformedWithState, anchors, num_classes: int, *,
                  per_class: bool = True, nms: str = "gaussian"):
    """(params, model_state, images, image_scales) -> {"boxes", "scores", "classes", "valid"}:
    the eval forward and `detection.generate_detections`, boxes in original-image pixels
    through image_scales [b]. per_class=True: the official COCO evaluation's (top 5000, NMS per
    class); False: the official inference mode (each anchor's best class, one class-agnostic
    NMS, boxes clipped to the input). Runs in float32; jittable and exportable."""
    if nms not in NMS_METHODS:
        raise ValueError(f"unknown NMS method {nms!r}: expected one of {', '.join(NMS_METHODS)}")
    anchors = jnp.asarray(anchors, jnp.float32)

    def run(params, model_state, images, image_scales):
        out, _ = model.apply(params, model_state, None, images, is_training=False)
        found = detection.generate_detections(
            out["class"], out["box"], anchors, num_classes, image_scales, method=nms,
            per_class=per_class,
            max_nms_inputs=detection.postprocess.MAX_NMS_INPUTS if per_class else 0,
            image_size=None if per_class else images.shape[1:3])
        return {"boxes": found.boxes, "scores": found.scores, "classes": found.classes,
                "valid": found.valid}

    return run


def eval_outputs(model: hk.TransformedWithState, anchors, num_classes: int, nms: str):
    """(params, model_state, batch) -> the batch's detections as the official evaluation makes
    them (`detections_fn` per class, through batch["scales"]), with the image ids; rows of
    masked examples marked invalid."""
    detect = detections_fn(model, anchors, num_classes, per_class=True, nms=nms)

    def outputs(params, model_state, batch):
        found = detect(params, model_state, batch["images"], batch["scales"])
        mask = batch["mask"]
        return {**found, "image_ids": batch["image_ids"], "mask": mask,
                "valid": found["valid"] & mask[:, None]}

    return outputs


def _eval_outputs(config, model):
    return eval_outputs(model, anchors(config.model, config.data.test_size),
                        config.data.num_classes, config.detection.nms)


def combine(collected, outputs) -> list:
    """Eval outputs are kept (on the host), not summed: a list of batches."""
    return [*(collected or []), jax.device_get(outputs)]


def concatenate(collected: list) -> dict:
    """`combine`'s batches as one dict of arrays over all the evaluated rows."""
    return {k: np.concatenate([b[k] for b in collected]) for k in collected[0]}


_GROUND_TRUTH: dict[str, dict] = {}


def ground_truth(data_config) -> dict:
    """`data.detection.ground_truth` of a config's `data`, read once per run's data config."""
    key = data_config.to_json()
    if key not in _GROUND_TRUTH:
        _GROUND_TRUTH.clear()
        _GROUND_TRUTH[key] = detection_data.ground_truth(data_config)
    return _GROUND_TRUTH[key]


def summarize(collected: list, config) -> dict:
    """COCO metrics (AP, AP50, ..., ARmax100: pycocotools' 12) of the collected detections
    against the eval split's ground truth (`data.detection.ground_truth`: built from the split,
    or config.data.eval_annotations), over the evaluated images. Detections of classes the
    ground truth does not declare are left out, as pycocotools would (COCO's ids skip some
    of the 90 head classes)."""
    batches = concatenate(collected)
    mask = batches["mask"].astype(bool)
    truth = ground_truth(config.data)
    rows = detection.detections_to_coco(batches["image_ids"][mask], batches["boxes"][mask],
                                        batches["scores"][mask], batches["classes"][mask],
                                        batches["valid"][mask])
    known = np.array([c["id"] for c in truth["categories"]])
    rows = rows[np.isin(rows[:, 6], known)]
    image_ids = [int(i) for i in batches["image_ids"][mask]]
    result = detection.coco_metrics(truth, rows, image_ids=image_ids)
    return {**result, "count": float(mask.sum())}


def train_line(means) -> str:
    line = f"cls {means['cls_loss']:.4f} | box {means['box_loss']:.5f}"
    if "iou_loss" in means:
        line += f" | iou {means['iou_loss']:.4f}"
    return line + f" | positives/image {means['positives']:.1f}"


def eval_line(result) -> str:
    return (f"AP {100 * result['AP']:.2f} | AP50 {100 * result['AP50']:.2f} | "
            f"AP75 {100 * result['AP75']:.2f} | AR100 {100 * result['ARmax100']:.2f}")


def final_line(label: str, result) -> str:
    return (f"test COCO mAP ({label}): AP {100 * result['AP']:.2f}, "
            f"AP50 {100 * result['AP50']:.2f}")


TASK = Task(name="detection", validate=validate, objective=_objective, train_data=train_data,
            num_train_examples=num_train_examples, eval_data=eval_data,
            eval_sums=_eval_outputs, summarize=summarize,
            train_line=train_line, eval_line=eval_line, final_line=final_line,
            eval_combine=combine)
