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

import data
from data import decode
from tools.evaluate import EvaluationError, class_names, describe_preprocessing, load

MAX_BATCH = 32


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
    loaded = load(weights, model=model, ema=ema, **preprocessing)
    labels = class_names(loaded.source, names)
    log(f"{loaded.source.description}; {describe_preprocessing(loaded)}")
    prepare = data.eval_preprocessor(loaded.data)
    rows, results = [], []
    for i, image in enumerate(images):
        where = _label(image, i)
        try:
            encoded = _read(image)
            converted_from = decode.conversion(encoded, loaded.data.max_image_pixels)
            rows.append((len(results), prepare(encoded)))
            results.append(Prediction(where, [], converted_from))
        except data.UnreadableImageError as e:
            reason = " ".join(str(e).split())
            results.append(data.UnreadableImageError(
                reason if reason.startswith(where) else f"{where}: {reason}"))
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
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--names", default=None, help="class names, one per line")
    parser.add_argument("--size", type=int, default=None, help="override the test size")
    parser.add_argument("--crop_fraction", type=float, default=None)
    parser.add_argument("--interpolation", default=None)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    try:
        results = predict_images(args.images, args.weights, top=args.top, model=args.model,
                                 ema=args.ema, names=args.names, log=say, size=args.size,
                                 crop_fraction=args.crop_fraction,
                                 interpolation=args.interpolation)
    except EvaluationError as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    failed = [r for r in results if isinstance(r, Exception)]
    converted = [f"{r.image} ({r.converted_from})" for r in results
                 if not isinstance(r, Exception) and r.converted_from]
    if converted:
        say(f"converted to RGB: {'; '.join(converted)}")
    for error in failed:
        say(f"{parser.prog}: unreadable: {error}")
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


if __name__ == "__main__":
    main(sys.argv[1:])
