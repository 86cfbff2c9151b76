"""What is in these pictures: the top classes of image files, prepared exactly as evaluation
prepares them (the weights' eval preprocessing, `tools.evaluate.load`).

    python -m tools.predict cat.jpg dog.png --weights resnet50.safetensors [--top 5]
    python -m tools.predict digit.png --weights runs/resnet18-local --ema --json
    python -m tools.predict photo.jpg --weights model.pth --model resnet50 --names names.txt

Class names: --names (a file, one name per line), else the weights file's, else the run's
dataset's (the built-in digits, an image folder's class directories, a TFDS dataset's labels),
else ImageNet's for a 1000-class head (the WordNet names of `data/imagenet_classes.txt`).
Grayscale, palette, CMYK and transparent images are converted to RGB, and the output says so
once; a file that is not an image is reported on one line and the others are still predicted
(exit status 1).

    from tools.predict import predict
    predict(["cat.jpg"], "resnet50.safetensors", top=3)   # [[("tabby, tabby cat", 0.41), ...]]

Detectors (weights of a registry task "detection" model, e.g. efficientdet_d0): each image is
prepared as the detection task evaluates it (scaled to fit the weights' test size and
zero-padded, `data.detection.eval_example`), run through the model and
`detection.generate_detections` (`training.detection.detections_fn`): by default the official
inference mode - each anchor's best class, one class-agnostic Gaussian soft-NMS (sigma 0.5),
100 detections, boxes clipped to the input - or with --per_class the COCO evaluation's (top
5000 (anchor, class) pairs, NMS per class); --nms hard for hard NMS (IoU 0.5). Boxes are then
clipped to the original image (those left without area, inside the padding, are dropped).
Detections scoring at least --threshold (default 0.4, the official visualisation's) are kept:
drawn with their class names and scores on a PNG per image in --out (default ./detections),
and listed in --out/detections.json ({"image", "output", "height", "width", "converted_from",
"detections": [{"box" [ymin, xmin, ymax, xmax] original px, "score", "class" (head index + 1),
"name"}]} per image). Class names: --names (one per class, line k names class k), the weights
file's, the run's detection dataset's, else "class k" (this codebase holds no COCO names list).

    python -m tools.predict street.jpg --weights d0.safetensors --out boxes/ --threshold 0.3

    from tools.predict import detect
    detect(["street.jpg"], "d0.safetensors")   # [[{"box": [...], "score", "class", "name"}]]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

import data
from data import decode
from data import detection as detection_data
from tools.evaluate import (EvaluationError, Loaded, LoadedDetector, class_names,
                            describe_preprocessing, load, load_any)
from training import detection as detection_task
from training import weight_sources

MAX_BATCH = 32
MAX_DETECTION_BATCH = 8
DEFAULT_THRESHOLD = 0.4        # the official visualisation's min_score_thresh
DEFAULT_OUT = "detections"
DETECTIONS_JSON = "detections.json"


class Prediction(NamedTuple):
    image: str
    top: list[tuple[int, str, float]]     # (class index, name, probability), best first
    converted_from: str | None            # what was converted to RGB (None: it was RGB)


def _read(image) -> bytes | np.ndarray:
    if isinstance(image, (bytes, np.ndarray)):
        return image
    try:
        with open(image, "rb") as f:
            return f.read()
    except OSError as e:
        raise data.UnreadableImageError(f"{image}: cannot read it: {e.strerror}") from None


def _label(image, i: int) -> str:
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {i}"


def predict_images(images, weights, *, top: int = 5, model: str | None = None,
                   ema: bool = False, names: str | None = None, log=lambda line: None,
                   **preprocessing) -> list[Prediction | data.UnreadableImageError]:
    """One `Prediction` per image (a path, encoded bytes or uint8 pixels [H, W(, C)]), or the
    `UnreadableImageError` saying why it cannot be read. `preprocessing` (size, crop_fraction,
    interpolation) overrides the weights' as in tools.evaluate."""
    if top <= 0:
        raise EvaluationError(f"--top must be positive, got {top}")
    loaded = (weights if isinstance(weights, Loaded)
              else load(weights, model=model, ema=ema, **preprocessing))
    labels = class_names(loaded.source, names)
    log(f"{loaded.source.description}; {describe_preprocessing(loaded)}")
    prepare = data.eval_preprocessor(loaded.data)
    images = list(images)
    rows, results = [], [None] * len(images)

    def each(index, where, encoded, converted_from):
        rows.append((index, prepare(encoded)))
        results[index] = Prediction(where, [], converted_from)

    for index, error in enumerate(_readable(images, loaded.data.max_image_pixels, each)):
        if error is not None:
            results[index] = error
    apply = _probabilities(loaded.model)
    k = min(top, len(labels))
    for start in range(0, len(rows), MAX_BATCH):
        chunk = rows[start:start + MAX_BATCH]
        batch = np.zeros((min(len(rows), MAX_BATCH), *chunk[0][1].shape), np.float32)
        batch[:len(chunk)] = [pixels for _, pixels in chunk]   # padded: one compile
        probabilities = np.asarray(apply(loaded.params, loaded.state, batch))
        for (index, _), p in zip(chunk, probabilities):
            best = np.argsort(-p, kind="stable")[:k]
            results[index] = results[index]._replace(
                top=[(int(c), labels[c], float(p[c])) for c in best])
    return results


@functools.lru_cache(maxsize=16)
def _probabilities(model):
    """(params, state, images) -> softmax probabilities, jitted once per model."""
    return jax.jit(lambda params, state, images: jax.nn.softmax(
        model.apply(params, state, None, images, is_training=False)[0].astype(jnp.float32)))


def _readable(images, max_pixels: int, each):
    """Per image: `each(index, where, encoded, converted_from)`, or the
    `UnreadableImageError` saying why it cannot be read, named by its file."""
    for i, image in enumerate(images):
        where = _label(image, i)
        try:
            encoded = _read(image)
            converted_from = decode.conversion(encoded, max_pixels)
            each(i, where, encoded, converted_from)
        except data.UnreadableImageError as e:
            reason = " ".join(str(e).split())
            yield data.UnreadableImageError(
                reason if reason.startswith(where) else f"{where}: {reason}")
        else:
            yield None


# Detectors.


class Detection(NamedTuple):
    box: tuple[float, float, float, float]   # (ymin, xmin, ymax, xmax), original-image px
    score: float
    class_id: int                            # head index + 1 (COCO ids for a 90-way head)
    name: str

    def to_json(self) -> dict:
        return {"box": list(self.box), "score": self.score, "class": self.class_id,
                "name": self.name}


class Detected(NamedTuple):
    image: str
    height: int
    width: int
    detections: list[Detection]           # best first, score >= the threshold
    converted_from: str | None
    output: str | None = None             # the PNG drawn, when an output directory was given

    def to_json(self) -> dict:
        return {"image": self.image, "output": self.output, "height": self.height,
                "width": self.width, "converted_from": self.converted_from,
                "detections": [d.to_json() for d in self.detections]}


def detection_class_names(source, names_file: str | None = None) -> list[str]:
    """Names of a detector's classes 1..num_classes (item k - 1 names class k): `names_file`
    (one per class), the weights file's, the run's detection dataset's, else "class k"."""
    n = source.num_classes
    names = None
    if names_file or source.class_names:
        names = class_names(source, names_file)   # the same checks as a classifier's
    else:
        names = weight_sources.dataset_class_names(source)
    names = list(names or [""] * n)
    return [name or f"class {k}" for k, name in enumerate(names, 1)]


@functools.lru_cache(maxsize=16)
def _detections(model, name: str, size: int, num_classes: int, per_class: bool, nms: str):
    """(params, state, images, image_scales) -> detections, jitted once per model and mode."""
    return jax.jit(detection_task.detections_fn(model, detection_task.anchors(name, size),
                                                num_classes,
                                 per_class=per_class, nms=nms))


def detect_images(images, weights, *, model: str | None = None, ema: bool = False,
                  names: str | None = None, threshold: float = DEFAULT_THRESHOLD,
                  per_class: bool = False, nms: str = "gaussian", size: int | None = None,
                  out: str | None = None, log=lambda line: None
                  ) -> list[Detected | data.UnreadableImageError]:
    """A detector's `Detected` per image (a path, encoded bytes or uint8 pixels [H, W(, C)]),
    or the `UnreadableImageError` saying why it cannot be read; see the module docstring.
    With `out` (a directory), writes a PNG per image with the detections drawn and
    `out`/detections.json."""
    if not 0 <= threshold <= 1:
        raise EvaluationError(f"--threshold must be in [0, 1], got {threshold}")
    if nms not in detection_task.NMS_METHODS:
        raise EvaluationError(f"--nms {nms!r}: choose from {', '.join(detection_task.NMS_METHODS)}")
    loaded = (weights if isinstance(weights, LoadedDetector)
              else load_any(weights, model=model, ema=ema, size=size))
    if not isinstance(loaded, LoadedDetector):
        raise EvaluationError(f"{loaded.source.model} is a classifier, not a detector: use "
                              "tools.predict.predict_images")
    labels = detection_class_names(loaded.source, names)
    mode = "per-class (COCO evaluation)" if per_class else "class-agnostic (official inference)"
    log(f"{loaded.source.description}; {describe_preprocessing(loaded)}; {mode} {nms} NMS, "
        f"score >= {threshold:g}")
    recipe = detection_data.Recipe.from_config(loaded.data)
    images = list(images)
    batch = max(1, min(len(images), MAX_DETECTION_BATCH))   # padded: one compile
    run = _detections(loaded.model, loaded.source.model, int(loaded.data.test_size),
                      loaded.num_classes, per_class, nms)
    if out is not None:
        os.makedirs(out, exist_ok=True)
    results: list = [None] * len(images)
    pending: list = []          # (index, where, pixels, converted_from, prepared, scale)
    used_names: set[str] = set()

    def flush():
        if not pending:
            return
        prepared = np.zeros((batch, *pending[0][4].shape), np.float32)
        prepared[:len(pending)] = [row[4] for row in pending]
        scales = np.ones((batch,), np.float32)
        scales[:len(pending)] = [np.float32(1) / row[5] for row in pending]
        found = jax.device_get(run(loaded.params, loaded.state, prepared, scales))
        for row, (index, where, pixels, converted_from, _, _) in enumerate(pending):
            height, width = pixels.shape[:2]
            limit = np.array([height, width, height, width], np.float32)
            boxes = np.clip(found["boxes"][row], 0, limit)
            # Boxes inside the padding have no area left in the image: dropped.
            keep = (found["valid"][row] & (found["scores"][row] >= threshold)
                    & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
            detections = [
                Detection(tuple(float(v) for v in box), float(score), int(c),
                          labels[int(c) - 1])
                for box, score, c in zip(boxes[keep], found["scores"][row][keep],
                                         found["classes"][row][keep])]
            output = None
            if out is not None:
                output = os.path.join(out, _output_name(where, index, used_names))
                draw_detections(pixels, detections).save(output)
            results[index] = Detected(where, height, width, detections, converted_from, output)
        pending.clear()

    def each(index, where, encoded, converted_from):
        pixels = decode.decode(encoded, max_pixels=recipe.max_image_pixels)
        prepared, scale = detection_data.eval_example(pixels, recipe)
        pending.append((index, where, pixels, converted_from, prepared, scale))
        if len(pending) == batch:
            flush()

    for index, error in enumerate(_readable(images, recipe.max_image_pixels, each)):
        if error is not None:
            results[index] = error
    flush()
    if out is not None:
        done = [r.to_json() for r in results if isinstance(r, Detected)]
        with open(os.path.join(out, DETECTIONS_JSON), "w") as f:
            json.dump({"model": loaded.source.model, "weights": loaded.source.description,
                       "threshold": threshold, "per_class": per_class, "nms": nms,
                       "images": done}, f, indent=1)
    return results


def _output_name(where: str, index: int, used: set[str]) -> str:
    stem = os.path.splitext(os.path.basename(where))[0] if os.sep in where or "." in where \
        else f"image_{index}"
    name = f"{stem}.png"
    if name in used:
        name = f"{stem}-{index}.png"
    used.add(name)
    return name


# Distinct outline colours, by class id.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0))


def draw_detections(pixels: np.ndarray, detections) -> Image.Image:
    """The image (uint8 HWC RGB) with each detection's box, class name and score drawn."""
    image = Image.fromarray(np.asarray(pixels, np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    line = max(1, round(min(image.size) / 200))
    for d in detections:
        ymin, xmin, ymax, xmax = d.box
        colour = PALETTE[d.class_id % len(PALETTE)]
        draw.rectangle([xmin, ymin, xmax, ymax], outline=colour, width=line)
        text = f"{d.name} {d.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        height = bottom - top + 2
        y = ymin - height if ymin >= height else ymin    # above the box, else inside it
        draw.rectangle([xmin, y, xmin + right - left + 2, y + height], fill=colour)
        draw.text((xmin + 1 - left, y + 1 - top), text, fill=(0, 0, 0), font=font)
    return image


def detect(images, weights, *, threshold: float = DEFAULT_THRESHOLD,
           **options) -> list[list[dict]]:
    """Per image, its detections scoring at least `threshold`, best first, as {"box" [ymin,
    xmin, ymax, xmax] original px, "score", "class", "name"}; an unreadable image raises its
    `data.UnreadableImageError`. `options`: those of `detect_images`."""
    out = []
    for result in detect_images(images, weights, threshold=threshold, **options):
        if isinstance(result, Exception):
            raise result
        out.append([d.to_json() for d in result.detections])
    return out


def predict(images, weights, *, top: int = 5, **options) -> list[list[tuple[str, float]]]:
    """Per image, its `top` classes as (name, probability), best first; an unreadable image
    raises its `data.UnreadableImageError`."""
    out = []
    for result in predict_images(images, weights, top=top, **options):
        if isinstance(result, Exception):
            raise result
        out.append([(name, p) for _, name, p in result.top])
    return out


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(prog="python -m tools.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--weights", required=True,
                        help="a training workdir, a nets.weights file or a PyTorch state dict")
    parser.add_argument("--model", default=None,
                        help="the weights' model: required for a PyTorch state dict, checked "
                             "against the others")
    parser.add_argument("--ema", action="store_true", help="a workdir's EMA weights")
    parser.add_argument("--top", type=int, default=None, help="classifiers (default 5)")
    parser.add_argument("--names", default=None, help="class names, one per line")
    parser.add_argument("--size", type=int, default=None, help="override the test size")
    parser.add_argument("--crop_fraction", type=float, default=None)
    parser.add_argument("--interpolation", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    detector = parser.add_argument_group("detectors")
    detector.add_argument("--threshold", type=float, default=None,
                          help=f"the least score kept and drawn (default {DEFAULT_THRESHOLD})")
    detector.add_argument("--per_class", action="store_true",
                          help="the COCO evaluation's post-processing (top 5000, NMS per "
                               "class) instead of the official inference's (class-agnostic)")
    detector.add_argument("--nms", default=None, choices=detection_task.NMS_METHODS,
                          help="soft (gaussian, default, official) or hard NMS")
    detector.add_argument("--out", default=None,
                          help=f"the directory of the drawn PNGs and {DETECTIONS_JSON} "
                               f"(default ./{DEFAULT_OUT})")
    args = parser.parse_args(argv)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    detector_options = {"--threshold": args.threshold, "--per_class": args.per_class or None,
                        "--nms": args.nms, "--out": args.out}
    try:
        loaded = load_any(args.weights, model=args.model, ema=args.ema, size=args.size,
                          crop_fraction=args.crop_fraction, interpolation=args.interpolation)
        if isinstance(loaded, LoadedDetector):
            if args.top is not None:
                raise EvaluationError(f"--top applies to classifiers; {loaded.source.model} "
                                      "is a detector (see --threshold)")
            return _main_detector(parser, args, loaded, say)
        given = [option for option, value in detector_options.items() if value is not None]
        if given:
            raise EvaluationError(f"{', '.join(given)} apply to detectors; "
                                  f"{loaded.source.model} is a classifier")
        results = predict_images(args.images, loaded, top=5 if args.top is None else args.top,
                                 names=args.names, log=say)
    except EvaluationError as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    failed = _report_input(parser, results, say)
    done = [r for r in results if not isinstance(r, Exception)]
    if args.json:
        print(json.dumps([{"image": r.image, "converted_from": r.converted_from,
                           "top": [{"class": c, "name": n, "probability": p}
                                   for c, n, p in r.top]} for r in done], indent=1))
    else:
        for r in done:
            print(r.image)
            for rank, (c, name, p) in enumerate(r.top, 1):
                print(f"  {rank}. {name} ({c}): {100 * p:.1f}%")
    if failed:
        sys.exit(1)
    return done


def _report_input(parser, results, say) -> list:
    """Says which images were converted to RGB (once) and which are unreadable (a line each);
    returns the unreadable ones."""
    failed = [r for r in results if isinstance(r, Exception)]
    converted = [f"{r.image} ({r.converted_from})" for r in results
                 if not isinstance(r, Exception) and r.converted_from]
    if converted:
        say(f"converted to RGB: {'; '.join(converted)}")
    for error in failed:
        say(f"{parser.prog}: unreadable: {error}")
    return failed


def _main_detector(parser, args, loaded, say) -> list:
    out = args.out or DEFAULT_OUT
    try:
        results = detect_images(
            args.images, loaded, names=args.names,
            threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold,
            per_class=args.per_class, nms=args.nms or "gaussian", out=out, log=say)
    except EvaluationError as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    failed = _report_input(parser, results, say)
    done = [r for r in results if not isinstance(r, Exception)]
    if args.json:
        print(json.dumps([r.to_json() for r in done], indent=1))
    else:
        for r in done:
            print(f"{r.image}: {len(r.detections)} detection(s) -> {r.output}")
            for d in r.detections:
                box = ", ".join(f"{v:.1f}" for v in d.box)
                print(f"  {d.name} ({d.class_id}): {100 * d.score:.1f}% [{box}]")
    say(f"wrote {os.path.abspath(os.path.join(out, DETECTIONS_JSON))}")
    if failed:
        sys.exit(1)
    return done


if __name__ == "__main__":
    main(sys.argv[1:])
