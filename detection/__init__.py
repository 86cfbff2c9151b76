"""EfficientDet detection primitives (official google/automl semantics), in JAX and NumPy only:
anchors, box coding and IoU, target assignment, losses and post-processing; the design
notes' point head's targets, loss and decoding (`keypoints`); and COCO mAP glue
(`coco_metric`: host NumPy, pycocotools imported only when `coco_metrics` runs). Imports no
project code; every function but the COCO glue is jittable on fixed shapes (anchors are NumPy
constants of the input size)."""

from detection.anchors import (ASPECT_RATIO_PAIRS, ASPECT_RATIOS, anchors_per_cell,
                               feature_sizes, flatten_levels, generate_anchors, split_levels)
from detection.boxes import area, clip_boxes, decode, encode, pairwise_iou
from detection.coco_metric import (COCO_METRIC_NAMES, coco_metrics, detections_to_coco,
                                    ground_truth_dict)
from detection.keypoints import (KeypointLoss, Keypoints, KeypointTargets, decode_keypoints,
                                 encode_batch, encode_points, keypoint_loss)
from detection.losses import (DetectionLoss, box_loss, detection_loss, focal_loss, iou_loss,
                              iou_variant, loss_normalizer)
from detection.postprocess import Detections, generate_detections, non_max_suppression
from detection.targets import Targets, assign_targets, assign_targets_batch, match

__all__ = [
    "ASPECT_RATIOS", "ASPECT_RATIO_PAIRS", "DetectionLoss", "Detections", "KeypointLoss",
    "KeypointTargets", "Keypoints", "Targets", "anchors_per_cell", "area", "assign_targets",
    "assign_targets_batch", "box_loss", "clip_boxes", "decode", "decode_keypoints",
    "detection_loss", "encode", "encode_batch", "encode_points", "feature_sizes",
    "flatten_levels", "focal_loss", "generate_anchors", "generate_detections", "iou_loss",
    "iou_variant", "keypoint_loss", "loss_normalizer", "match", "non_max_suppression",
    "pairwise_iou", "split_levels",
    "COCO_METRIC_NAMES", "coco_metrics", "detections_to_coco", "ground_truth_dict",
]
