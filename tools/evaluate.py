"""Evaluate weights on a dataset with the preprocessing the weights travel with.

    python -m tools.evaluate --weights runs/resnet18-local --data sklearn_digits [--ema]
    python -m tools.evaluate --weights resnet50.safetensors --data imagenet2012 --data_dir DIR
    python -m tools.evaluate --weights resnet50.pth --model resnet50 --data image_folder \\
        --data_dir ROOT --split val --size 256 --crop_fraction 0.95

--weights is anything `training.weight_sources.read` reads: a training workdir (its params, or
its EMA with --ema), a `nets.weights` file (`tools.convert`'s output) or a PyTorch state dict of
the reference (with --model). The eval preprocessing is the weights': a run's config, a weights
file's metadata, the registry's reference preprocessing for a state dict; --size,
--crop_fraction and --interpolation override it, and the printed header says which are in force.
The data is any source the trainer reads (a TFDS name with --data_dir, `image_folder` with its
root, the built-in `sklearn_digits`); every example of the split is counted once (the last
batch is padded and masked), over all local devices, by the trainer's own evaluation
(`training.loop.evaluate_variables` with the classification task's sums). Prints top-1, top-5,
loss and images per second, and writes the results with per-class top-1 as JSON.

    from tools.evaluate import evaluate
    result = evaluate("runs/resnet18-local", "sklearn_digits", ema=True)
    result["top1"], result["per_class"]     # [{"class", "name", "top1", "count"}, ...]

Detectors (a registry task of "detection", e.g. efficientdet_d0): --data names a detection
dataset (default the built-in `sklearn_digits_detection`; a TFDS dataset with coco/2017's
features, or `coco_json` with its root as --data_dir), the images are prepared as the detection
task evaluates them (scaled to fit the weights' test size, zero-padded: `data.detection`), and
the detection task's own evaluation runs (`training.detection.eval_outputs` - top 5000, per-class
NMS, `--nms gaussian` (default, the official COCO evaluation) or `hard`, top 100 - collected by
`training.loop.evaluate_variables` with `training.detection.combine`, then
`training.detection.summarize`): COCO mAP (AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l) is
printed as a table and written to the JSON. Only --size overrides a detector's preprocessing.

    python -m tools.evaluate --weights runs/efficientdet_d0-local --ema    # built-in dataset
    python -m tools.evaluate --weights d0.safetensors --data coco_json --data_dir COCO \
        --split val2017
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, NamedTuple

import ml_collections
import numpy as np

import data
import detection
import nets
from data import sources
from data import builtin_detection
from data import detection as detection_data
from data.classification import Recipe, eval_batches, eval_config
from training import classification, distributed, loop, steps, weight_sources
from training import detection as detection_task

# What the flags may change of the weights' eval preprocessing: {option: data config field}.
OVERRIDABLE = {"size": "test_size", "crop_fraction": "crop_fraction",
               "interpolation": "interpolation"}
DEFAULT_BATCH = 256
# Detectors: only the size of their scale-to-fit-and-pad preprocessing can be overridden.
DETECTION_OVERRIDABLE = ("size",)
DEFAULT_DETECTION_BATCH = 16
DEFAULT_DETECTION_DATA = builtin_detection.NAME
DETECTION_NMS = detection_task.NMS_METHODS          # evaluation: per-class, "gaussian" default
MAX_BOXES = 100                                     # padded ground truth per image (official)


class EvaluationError(ValueError):
    """Weights, data or options that do not go together; the message is one line."""


class Loaded(NamedTuple):
    """Weights ready for inference: the transformed model, its variables and the eval data
    config (`data` section) that prepares images for it."""

    source: weight_sources.Source
    model: Any           # hk.TransformedWithState
    params: Any
    state: Any
    data: ml_collections.ConfigDict
    overridden: dict[str, Any]   # {option (OVERRIDABLE): value} given by the caller


def read_source(weights, *, model: str | None = None,
                ema: bool = False) -> weight_sources.Source:
    """The weights at `weights` (`training.weight_sources.read`), checked against `model`."""
    try:
        source = weight_sources.read(weights, model=model, ema=ema)
    except (ValueError, FileNotFoundError) as e:
        raise EvaluationError(str(e)) from None
    if model is not None and source.model != model:
        raise EvaluationError(f"{weights} holds {source.model} weights, not {model}")
    return source


def load(weights, *, model: str | None = None, ema: bool = False, **preprocessing) -> Loaded:
    """The weights at `weights` with their eval preprocessing, `preprocessing` (size,
    crop_fraction, interpolation) overriding it. `model`, if given, must be the weights' model
    (and is needed for a PyTorch state dict). Classifiers only: see `load_any`."""
    loaded = load_any(weights, model=model, ema=ema, **preprocessing)
    if not isinstance(loaded, Loaded):
        raise EvaluationError(f"{loaded.source.model} is a detection model; load it with "
                              "tools.evaluate.load_detector (or load_any)")
    return loaded


def load_detector(weights, *, model: str | None = None, ema: bool = False,
                  size: int | None = None) -> LoadedDetector:
    """A detector's weights with their eval preprocessing (scale to fit `size`, default the
    weights' test size, and pad). Refuses a classifier."""
    loaded = load_any(weights, model=model, ema=ema, size=size)
    if not isinstance(loaded, LoadedDetector):
        raise EvaluationError(f"{loaded.source.model} is a classification model, not a "
                              "detector; load it with tools.evaluate.load")
    return loaded


def load_any(weights, *, model: str | None = None, ema: bool = False,
             **preprocessing) -> Loaded | LoadedDetector:
    """`load` for a classifier, a `LoadedDetector` for a detector (registry task
    "detection"); other tasks are refused. `weights` may be a `Source` already read."""
    source = (weights if isinstance(weights, weight_sources.Source)
              else read_source(weights, model=model, ema=ema))
    task = nets.model_info(source.model).task
    if task == "detection":
        return _load_detector(source, preprocessing)
    if task != "classification":
        raise EvaluationError(f"{source.model} is a {task} model; this tool evaluates and "
                              "predicts with classifiers and detectors")
    unknown = sorted(set(preprocessing) - set(OVERRIDABLE))
    if unknown:
        raise EvaluationError(f"unknown preprocessing option(s) {unknown}; choose from "
                              f"{sorted(OVERRIDABLE)}")
    overridden = {k: v for k, v in preprocessing.items() if v is not None}
    cfg = eval_config({**source.eval_preprocessing,
                       **{OVERRIDABLE[k]: v for k, v in overridden.items()}},
                      source.num_classes)
    try:
        Recipe.from_config(cfg)   # e.g. a non-bicubic TF resize
    except ValueError as e:
        raise EvaluationError(str(e)) from None
    params, state = weight_sources.variables(source)
    f = _transformed(source.model, source.num_classes, json.dumps(source.overrides,
                                                                  sort_keys=True))
    return Loaded(source, f, params, state, cfg, overridden)


class LoadedDetector(NamedTuple):
    """A detector ready for inference: the transformed model, its variables, the detection
    task's eval data config (`data` section: test_size, mean, std, ...) and the anchors of its
    outputs at that size."""

    source: weight_sources.Source
    model: Any           # hk.TransformedWithState
    params: Any
    state: Any
    data: ml_collections.ConfigDict
    overridden: dict[str, Any]   # {"size": value} when given
    anchors: np.ndarray          # [N, 4] input px, the order of the flattened outputs

    @property
    def num_classes(self) -> int:
        return self.source.num_classes


def detection_eval_config(preprocessing: dict, num_classes: int, *, name: str = "",
                          data_dir: str = "", split: str = "", workers: int = 0):
    """A detection data config (a config's `data` section) that evaluates only:
    `preprocessing` holds the weights' eval fields (test_size, mean, std are read; images are
    scaled to fit test_size and zero-padded); `data.detection.eval_batches` reads it."""
    size = int(preprocessing["test_size"])
    return ml_collections.ConfigDict(dict(
        {k: preprocessing[k] for k in nets.weights.EVAL_PREPROCESSING_FIELDS}, test_size=size,
        name=name, data_dir=data_dir, train_split="", eval_split=split,
        num_classes=num_classes, train_size=size, flip=False, scale_min=1.0, scale_max=1.0,
        max_boxes=MAX_BOXES, workers=workers, skip_unreadable=False,
        max_image_pixels=data.DEFAULT_MAX_IMAGE_PIXELS, eval_annotations=""))


def _load_detector(source: weight_sources.Source, preprocessing: dict) -> LoadedDetector:
    given = {k: v for k, v in preprocessing.items() if v is not None}
    refused = sorted(set(given) - set(DETECTION_OVERRIDABLE))
    if refused:
        raise EvaluationError(
            f"{', '.join('--' + k for k in refused)} does not apply to {source.model}: a "
            "detector's images are scaled to fit its test size and zero-padded "
            "(data.detection.eval_example, TF's bilinear resize); only --size overrides it")
    size = given.get("size")
    if size is not None and size <= 0:
        raise EvaluationError(f"--size must be positive, got {size}")
    cfg = detection_eval_config({**source.eval_preprocessing,
                                 **({"test_size": size} if size else {})}, source.num_classes)
    params, state = weight_sources.variables(source)
    f = _transformed(source.model, source.num_classes, json.dumps(source.overrides,
                                                                  sort_keys=True))
    anchors = detection_task.anchors(source.model,
                                     cfg.test_size)
    return LoadedDetector(source, f, params, state, cfg, given, anchors)


# One transformed model (and so one jitted function per use) per variant, so that evaluating or
# predicting again in a notebook or a test compiles nothing new for the same shapes.
@functools.lru_cache(maxsize=16)
def _transformed(model: str, num_classes: int, overrides_json: str):
    return nets.transformed(model, num_classes=num_classes, **json.loads(overrides_json))


@functools.lru_cache(maxsize=16)
def _eval_fn(model, mesh):
    return steps.eval_step(classification.eval_sums(model, per_class=True), mesh)


@functools.lru_cache(maxsize=16)
def _detection_eval_fn(model, name: str, size: int, num_classes: int, nms: str, mesh):
    anchors = detection_task.anchors(name, size)
    return steps.eval_step(detection_task.eval_outputs(model, anchors, num_classes, nms), mesh)


def describe_preprocessing(loaded: Loaded | LoadedDetector) -> str:
    """One line: the eval preprocessing in force, where it comes from and what was set."""
    cfg, set_by = loaded.data, loaded.overridden
    mark = lambda option: f" (set: {option})" if option in set_by else ""
    if isinstance(loaded, LoadedDetector):
        mean = ", ".join(f"{m:g}" for m in cfg.mean)
        std = ", ".join(f"{s:g}" for s in cfg.std)
        return (f"preprocessing from {loaded.source.preprocessing_from}: scaled to fit "
                f"{cfg.test_size} px{mark('size')} and zero-padded (TF bilinear), mean "
                f"({mean}), std ({std})")
    method = cfg.eval_preprocess
    crop = (f", crop fraction {cfg.crop_fraction:g}{mark('crop_fraction')}"
            if method == "resize_shorter_crop" else "")
    mean = ", ".join(f"{m:g}" for m in cfg.mean)
    std = ", ".join(f"{s:g}" for s in cfg.std)
    return (f"preprocessing from {loaded.source.preprocessing_from}: {method} to "
            f"{cfg.test_size} px{mark('size')}{crop}, {cfg.interpolation}"
            f"{mark('interpolation')} ({cfg.image_ops} ops), mean ({mean}), std ({std})")


def class_names(source: weight_sources.Source, names_file: str | None = None) -> list[str]:
    """Names of the head's outputs: from `names_file` (one per line), the weights file, the
    run's dataset, ImageNet's for a 1000-class head, else "class <i>"."""
    n = source.num_classes
    if names_file:
        try:
            names = [line.strip() for line in
                     pathlib.Path(names_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            raise EvaluationError(f"cannot read the names file: {e}") from None
        if len(names) != n:
            raise EvaluationError(f"{names_file} has {len(names)} names; the head has {n} "
                                  "outputs")
        return names
    if source.class_names:
        return list(source.class_names)
    names = weight_sources.dataset_class_names(source)
    if names:
        return names
    if n == 1000:
        return list(sources.imagenet_classes().values())
    return [f"class {i}" for i in range(n)]


def _check_classes(loaded: Loaded) -> list[str]:
    """The dataset's class names, whose count must be the head's."""
    cfg = loaded.data
    names = sources.class_names(cfg.name, sources.data_dir(cfg.data_dir))
    if len(names) != loaded.source.num_classes:
        raise EvaluationError(
            f"{cfg.name} has {len(names)} classes, but the weights' head ({loaded.source.model})"
            f" has {loaded.source.num_classes} outputs: evaluate weights trained for this "
            "dataset's classes")
    return names


def _batch_size(batch_size: int | None, default: int, mesh) -> int:
    batch_size = batch_size or math.ceil(default / mesh.size) * mesh.size
    if batch_size <= 0 or batch_size % mesh.size:
        raise EvaluationError(f"the batch size ({batch_size}) must be a positive multiple of "
                              f"the {mesh.size} local devices")
    return batch_size


def evaluate(weights, data: str | None = None, *, split: str | None = None,
             data_dir: str = "", model: str | None = None, ema: bool = False,
             batch_size: int | None = None, size: int | None = None,
             crop_fraction: float | None = None, interpolation: str | None = None,
             nms: str | None = None, workers: int = 0, progress: bool = False,
             log=lambda line: None) -> dict:
    """Top-1, top-5, loss and per-class top-1 of a classifier's `weights` over a whole split
    of `data` (default sklearn_digits), or a detector's COCO mAP (default data: the built-in
    sklearn_digits_detection; `nms` "gaussian" (default) or "hard"); see the module docstring.
    `log` receives the header lines. Returns a JSON-ready dict."""
    loaded = load_any(weights, model=model, ema=ema, size=size, crop_fraction=crop_fraction,
                      interpolation=interpolation)
    if isinstance(loaded, LoadedDetector):
        return _evaluate_detector(loaded, data or DEFAULT_DETECTION_DATA, split=split,
                                  data_dir=data_dir, batch_size=batch_size,
                                  nms=nms or "gaussian", workers=workers, progress=progress,
                                  log=log)
    if nms is not None:
        raise EvaluationError(f"--nms applies to detectors; {loaded.source.model} is a "
                              "classifier")
    data = data or "sklearn_digits"
    cfg = loaded.data
    cfg.name, cfg.data_dir, cfg.workers = data, data_dir, workers
    try:
        names = _check_classes(loaded)
        cfg.eval_split = split or sources.default_eval_split(data, sources.data_dir(data_dir))
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(str(e)) from None
    mesh = distributed.data_mesh()
    batch_size = _batch_size(batch_size, DEFAULT_BATCH, mesh)
    try:
        batches = eval_batches(cfg, global_batch=batch_size)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(str(e)) from None
    total = batches.num_examples
    log(f"evaluating the {loaded.source.description}")
    log(f"on {data}:{cfg.eval_split} ({total} examples) in batches of {batch_size} over "
        f"{mesh.size} {mesh.devices.flat[0].platform} device(s)")
    log(describe_preprocessing(loaded))
    eval_fn = _eval_fn(loaded.model, mesh)
    timing = _Timing(total, progress)
    try:
        summed = loop.evaluate_variables(batches, eval_fn,
                                         {"weights": (loaded.params, loaded.state)}, mesh,
                                         on_batch=timing.batch_done)
    finally:
        timing.close()
    result = classification.summarize(summed["weights"])
    result["count"] = int(result["count"])
    # A list, not a dict by name: ImageNet has two classes named "crane" and two "maillot".
    result["per_class"] = [{"class": i, "name": name, "top1": top1, "count": count}
                           for i, (name, top1, count) in enumerate(zip(
                               names, result.pop("per_class_top1"),
                               result.pop("per_class_count")))]
    return {"model": loaded.source.model, "weights": loaded.source.description,
            "data": data, "split": cfg.eval_split, "batch_size": batch_size,
            "preprocessing": {k: cfg[k] for k in nets.weights.EVAL_PREPROCESSING_FIELDS},
            "preprocessing_from": loaded.source.preprocessing_from,
            "overridden": loaded.overridden,
            **result, "images_per_second": timing.images_per_second()}


def default_detection_split(name: str, data_dir: str = "") -> str:
    """The split a detection dataset is evaluated on: a TFDS dataset's first of
    `sources.EVAL_SPLITS`; a coco_json root's first of those (and val2017, COCO's) that has
    an annotations/instances_<split>.json."""
    directory = sources.data_dir(data_dir)
    if name != detection_data.COCO_JSON:
        return sources.default_eval_split(name, directory)
    candidates = (*sources.EVAL_SPLITS, "val2017")
    for split in candidates:
        if (pathlib.Path(directory) / "annotations" / f"instances_{split}.json").is_file():
            return split
    raise EvaluationError(f"coco_json {directory!r} has no annotations/instances_<split>.json "
                          f"for a split named {', '.join(candidates)}; name it with --split")


def _check_detection_classes(loaded: LoadedDetector) -> None:
    """The dataset's labels (category ids) must be the head's classes: its largest id is the
    head's class count (COCO's 80 categories have ids up to 90, the official 90-way head)."""
    cfg, n, model = loaded.data, loaded.num_classes, loaded.source.model
    where = f"{cfg.name}:{cfg.eval_split}"
    try:
        categories = detection_data.open_source(cfg, cfg.eval_split).categories
    except detection_data.DetectionDataError as e:
        if "num_classes" not in str(e):
            raise
        raise EvaluationError(f"{where} has more classes than the weights' head ({model}) has "
                              f"outputs ({n}): evaluate weights trained for this dataset's "
                              f"classes ({' '.join(str(e).split())})") from None
    largest = max((label for label, _ in categories), default=0)
    if largest != n:
        raise EvaluationError(f"{where} has labels up to {largest} ({len(categories)} "
                              f"classes), but the weights' head ({model}) has {n} classes: "
                              "evaluate weights trained for this dataset's classes")


def _evaluate_detector(loaded: LoadedDetector, data: str, *, split, data_dir, batch_size,
                       nms, workers, progress, log) -> dict:
    """COCO mAP of a detector: the detection task's evaluation (see the module docstring)."""
    if nms not in DETECTION_NMS:
        raise EvaluationError(f"--nms {nms!r}: choose from {', '.join(DETECTION_NMS)}")
    cfg = loaded.data
    cfg.name, cfg.data_dir, cfg.workers = data, data_dir, workers
    mesh = distributed.data_mesh()
    batch_size = _batch_size(batch_size, DEFAULT_DETECTION_BATCH, mesh)
    try:
        cfg.eval_split = split or default_detection_split(data, data_dir)
        _check_detection_classes(loaded)
        batches = detection_data.eval_batches(cfg, global_batch=batch_size)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(str(e)) from None
    total = batches.num_examples
    log(f"evaluating the {loaded.source.description}")
    log(f"on {data}:{cfg.eval_split} ({total} examples) in batches of {batch_size} over "
        f"{mesh.size} {mesh.devices.flat[0].platform} device(s); COCO mAP after per-class "
        f"{nms} NMS")
    log(describe_preprocessing(loaded))
    eval_fn = _detection_eval_fn(loaded.model, loaded.source.model, cfg.test_size,
                                 loaded.num_classes, nms, mesh)
    timing = _Timing(total, progress)
    try:
        collected = loop.evaluate_variables(batches, eval_fn,
                                            {"weights": (loaded.params, loaded.state)}, mesh,
                                            on_batch=timing.batch_done,
                                            combine=detection_task.combine)
    finally:
        timing.close()
    images_per_second = timing.images_per_second()
    try:
        result = detection_task.summarize(collected["weights"],
                                          ml_collections.ConfigDict({"data": cfg}))
    except ValueError as e:   # the ground truth: an unreadable image, a broken json
        raise EvaluationError(str(e)) from None
    result["count"] = int(result["count"])
    return {"model": loaded.source.model, "task": "detection",
            "weights": loaded.source.description, "data": data, "split": cfg.eval_split,
            "batch_size": batch_size, "nms": nms,
            "preprocessing": {k: cfg[k] for k in nets.weights.EVAL_PREPROCESSING_FIELDS},
            "preprocessing_from": loaded.source.preprocessing_from,
            "overridden": loaded.overridden, **result,
            "images_per_second": images_per_second}


def detection_table(result: dict) -> str:
    """COCO mAP of `evaluate`'s detector result as a table, in percent ("-" where COCOeval
    has no objects of that size: -1)."""
    rows = []
    for names in (detection.COCO_METRIC_NAMES[:6], detection.COCO_METRIC_NAMES[6:]):
        cell = lambda name: "-" if result[name] < 0 else f"{100 * result[name]:.2f}"
        rows.append("  ".join(f"{n:>8}" for n in names))
        rows.append("  ".join(f"{cell(n):>8}" for n in names))
    return "\n".join(rows)


class _Timing:
    """A progress bar, and images per second after the first batch (which compiles)."""

    def __init__(self, total: int, progress: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr,
                        dynamic_ncols=True)
        self.first_done, self.after_first = None, 0
        self.start = time.perf_counter()

    def batch_done(self, local: dict) -> None:
        count = int(np.sum(local["mask"]))
        self.bar.update(count)
        if self.first_done is None:
            self.first_done = time.perf_counter()
        else:
            self.after_first += count

    def images_per_second(self) -> float:
        end = time.perf_counter()
        if self.after_first and end > self.first_done:
            return self.after_first / (end - self.first_done)
        return self.bar.n / (end - self.start)

    def close(self) -> None:
        self.bar.close()


def default_output(result: dict, ema: bool) -> str:
    slug = lambda text: re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
    return (f"eval-{slug(result['model'])}-{slug(result['data'])}-{slug(result['split'])}"
            f"{'-ema' if ema else ''}.json")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True,
                        help="a training workdir, a nets.weights file or a PyTorch state dict")
    parser.add_argument("--data", default=None,
                        help="a TFDS name[:version], image_folder, or sklearn_digits (default); "
                             "for a detector a detection dataset: a TFDS name, coco_json, or "
                             f"{DEFAULT_DETECTION_DATA} (default)")
    parser.add_argument("--data_dir", default="",
                        help="the TFDS data dir (default $TFDS_DATA_DIR or "
                             "~/tensorflow_datasets), or an image folder's root")
    parser.add_argument("--split", default=None,
                        help=f"default: the first of {', '.join(sources.EVAL_SPLITS)} it has")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"global batch (default {DEFAULT_BATCH}, a detector's "
                             f"{DEFAULT_DETECTION_BATCH}, rounded up to a multiple of the "
                             "devices)")
    parser.add_argument("--model", default=None,
                        help="the weights' model: required for a PyTorch state dict, checked "
                             "against the others")
    parser.add_argument("--ema", action="store_true", help="a workdir's EMA weights")
    parser.add_argument("--size", type=int, default=None, help="override the test size")
    parser.add_argument("--crop_fraction", type=float, default=None,
                        help="override the crop fraction (resize_shorter_crop)")
    parser.add_argument("--interpolation", default=None, help="override the interpolation")
    parser.add_argument("--nms", default=None, choices=DETECTION_NMS,
                        help="detectors: the per-class NMS of the COCO evaluation (default "
                             "gaussian, the official soft-NMS)")
    parser.add_argument("--workers", type=int, default=0,
                        help="decoding processes (0: threads; -1: one per core)")
    parser.add_argument("--out", default=None,
                        help="the JSON to write (default eval-<model>-<data>-<split>.json)")
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.weights, args.data, split=args.split, data_dir=args.data_dir,
                          model=args.model, ema=args.ema, batch_size=args.batch,
                          size=args.size, crop_fraction=args.crop_fraction,
                          interpolation=args.interpolation, nms=args.nms,
                          workers=args.workers, progress=True, log=print)
    except (EvaluationError, data.UnreadableImageError) as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    if result.get("task") == "detection":
        print(f"COCO mAP (%), {result['nms']} NMS:")
        print(detection_table(result))
        print(f"{result['count']} images | {result['images_per_second']:.1f} img/s")
    else:
        _print_classification(result)
    out = args.out or default_output(result, args.ema)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.abspath(out)}")
    return result


def _print_classification(result: dict) -> None:
    print(f"top-1 {100 * result['top1']:.2f}% | top-5 {100 * result['top5']:.2f}% | loss "
          f"{result['loss']:.4f} | {int(result['count'])} images | "
          f"{result['images_per_second']:.1f} img/s")


if __name__ == "__main__":
    main(sys.argv[1:])
