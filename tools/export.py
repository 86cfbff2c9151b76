"""Export a model's eval-mode forward as a serialized StableHLO artifact (`jax.export`).

    python -m tools.export resnet50 --out resnet50.jaxexport [--weights resnet50.safetensors]

    from tools.export import export, load
    blob = export("resnet50", params, state)          # bytes
    logits = load(blob)(images)                         # needs only jax to run

The artifact takes float32 images [b, size, size, C] (NHWC, already normalised; [b, T, size,
size, C] clips for video models) for any batch b, and returns float32 logits. The weights and
BatchNorm statistics are baked into it as constants, so it is self-contained: the loader needs
neither this package nor Haiku. The spatial size is fixed at export (`size`, default the
variant's test size).

A detector (registry task "detection", e.g. efficientdet_d0) is exported with its
post-processing inside (`training.detection.detections_fn`): it takes float32 images
[b, size, size, 3] (normalised, scaled to fit and zero-padded as `data.detection.eval_example`
makes them) and image_scales [b]
(original-image px per input px: 1 / the scale eval_example returns) and returns fixed-size
{"boxes" [b, 100, 4] (ymin, xmin, ymax, xmax) in original-image pixels, "scores" [b, 100],
"classes" [b, 100] int32 (head index + 1), "valid" [b, 100] bool}, best first. The
post-processing is the official inference's by default (class-agnostic "global" NMS over each
anchor's best class, Gaussian soft-NMS, boxes clipped to the input), or the COCO evaluation's
with --per_class (top 5000, per-class NMS); --nms hard for hard NMS. Boxes are clipped to the
padded input, not to the original image (its size is not an input): clip them to (h, w).

    python -m tools.export efficientdet_d0 --weights d0.safetensors --out d0.jaxexport
    run = load(blob); out = run(images, image_scales)     # out["boxes"], ["scores"], ...

The conv lowering is chosen when the model is traced (`nets.layers.default_lowering`), i.e. for
the exporting machine's backend; set NETS_CONV_LOWERING=native when exporting on a CPU for an
accelerator (outputs are the same either way, only the speed differs).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import nets
from training import detection as detection_task
from training import weight_sources


def load_variables(name: str, weights: str | None = None, num_classes: int | None = None,
                   seed: int = 0, **overrides):
    """(params, state) of the variant: from any weights `training.weight_sources.read` reads
    (a `nets.weights` file, a training workdir, or a PyTorch state dict of its reference,
    converted by `nets.convert.from_torch`), checked strictly against the variant; or a random
    init from `seed` without `weights`."""
    if weights is None:
        f = nets.transformed(name, num_classes, **overrides)
        images = nets.introspect.example_images(name, 1, 64, **overrides)  # params: any size
        init = jax.jit(f.init, static_argnames="is_training")
        return init(jax.random.key(seed), jnp.zeros(images.shape, images.dtype),
                    is_training=True)
    return weight_sources.variables(_read(name, weights, num_classes), name, num_classes,
                                    **overrides)


def _read(name: str, weights: str, num_classes: int | None) -> weight_sources.Source:
    if not os.path.exists(weights):
        raise ValueError(f"weights file {weights!r} does not exist")
    return weight_sources.read(weights, model=name, num_classes=num_classes)


def export(name: str, params, state, num_classes: int | None = None, size: int | None = None,
           platforms: tuple[str, ...] | None = None, fused: bool = False, **overrides) -> bytes:
    """The serialized eval forward of `name` with these variables baked in. `num_classes`
    defaults to the head's size in `params` (0, pooled features, when there is no head);
    `platforms` (e.g. ("cpu", "cuda")) defaults to the current backend. fused=True folds every
    BatchNorm into the conv before it first (`nets.fusion`): the same function, fewer ops.
    Weights fused already (`tools.fuse`) are exported as they are, with fused=True. A detector
    is exported with its post-processing (`export_detector`, its default options)."""
    info = nets.model_info(name)
    if info.task == "detection":
        return export_detector(name, params, state, num_classes, size, platforms, fused,
                               **overrides)
    if num_classes is None:
        num_classes = nets.introspect.num_classes_of(name, params, overrides)
    if size is not None and size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if fused and state:   # fused weights carry no BatchNorm statistics: nothing left to fold
        params, state = nets.fusion.fuse(name, params, state, num_classes, **overrides)
    f = nets.transformed(name, num_classes, fused=fused, **overrides)
    example = nets.introspect.example_images(name, 1, size or info.test_size, **overrides)
    params, state = jax.tree.map(jnp.asarray, (params, state))

    def forward(images):
        # Closed over, the variables become constants of the exported module.
        logits, _ = f.apply(params, state, None, images, is_training=False)
        return logits.astype(jnp.float32)

    batch, = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((batch, *example.shape[1:]), jnp.float32)
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(spec)
    return bytes(exported.serialize())


def export_detector(name: str, params, state, num_classes: int | None = None,
                    size: int | None = None, platforms: tuple[str, ...] | None = None,
                    fused: bool = False, per_class: bool = False, nms: str = "gaussian",
                    **overrides) -> bytes:
    """The serialized eval forward of the detector `name` with its post-processing
    (`training.detection.detections_fn`) and these variables baked in: (images [b, size, size,
    3], image_scales [b]) -> {"boxes", "scores", "classes", "valid"}, for any batch b."""
    info = nets.model_info(name)
    if info.task != "detection":
        raise ValueError(f"{name} is a {info.task} model, not a detector")
    if num_classes is None:
        num_classes = nets.introspect.num_classes_of(name, params, overrides)
    if size is not None and size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    size = size or info.test_size
    if fused and state:
        params, state = nets.fusion.fuse(name, params, state, num_classes, **overrides)
    f = nets.transformed(name, num_classes, fused=fused, **overrides)
    run = detection_task.detections_fn(f, detection_task.anchors(name, size), num_classes,
                                       per_class=per_class, nms=nms)
    params, state = jax.tree.map(jnp.asarray, (params, state))

    def forward(images, image_scales):
        return run(params, state, images, image_scales)

    batch, = jax.export.symbolic_shape("b")
    specs = (jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
             jax.ShapeDtypeStruct((batch,), jnp.float32))
    exported = jax.export.export(jax.jit(forward), platforms=platforms)(*specs)
    return bytes(exported.serialize())


def load(blob: bytes):
    """A callable from `export`'s bytes (needs only jax): images -> logits, or for a detector
    (images, image_scales) -> {"boxes", "scores", "classes", "valid"}."""
    exported = jax.export.deserialize(bytearray(blob))
    return exported.call


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("--out", required=True, help="the artifact's path (.jaxexport)")
    parser.add_argument("--weights", default=None,
                        help="a nets.weights .safetensors file (tools.convert's output) or a "
                             "PyTorch state dict of the reference (.pth/.pt/.bin/.safetensors); "
                             "without it, a random init from --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-classes", type=int, default=None,
                        help="default: the weights' head, 1000 for a random init")
    parser.add_argument("--size", type=int, default=None, help="default: the test size")
    parser.add_argument("--fused", action="store_true",
                        help="fold every BatchNorm into the conv before it (nets.fusion)")
    parser.add_argument("--platforms", nargs="*", default=None,
                        help="e.g. cpu cuda (default: this machine's backend)")
    parser.add_argument("--per_class", action="store_true",
                        help="detectors: the COCO evaluation's post-processing (top 5000, "
                             "per-class NMS) instead of the official inference's (one "
                             "class-agnostic NMS)")
    parser.add_argument("--nms", default="gaussian", choices=detection_task.NMS_METHODS,
                        help="detectors: soft (gaussian, default, official) or hard NMS")
    args = parser.parse_args(argv)
    is_detector = nets.model_info(args.name).task == "detection"
    if not is_detector and (args.per_class or args.nms != "gaussian"):
        parser.error(f"--per_class and --nms apply to detectors; {args.name} is not one")
    overrides = {}   # those the weights were saved with (a file's fused=True, a run's options)
    size = args.size
    if args.weights:
        source = _read(args.name, args.weights, args.num_classes)
        overrides = dict(source.overrides) if source.model == args.name else {}
        params, state = weight_sources.variables(source, args.name, args.num_classes)
        if size is None and source.eval_preprocessing and is_detector:
            size = int(source.eval_preprocessing["test_size"])   # the weights' anchors
    else:
        params, state = load_variables(args.name, None, args.num_classes, args.seed)
    fused = args.fused or overrides.pop("fused", False)
    platforms = tuple(args.platforms) if args.platforms else None
    if is_detector:
        blob = export_detector(args.name, params, state, args.num_classes, size, platforms,
                               fused=fused, per_class=args.per_class, nms=args.nms,
                               **overrides)
    else:
        blob = export(args.name, params, state, args.num_classes, size, platforms,
                      fused=fused, **overrides)
    with open(args.out, "wb") as f:
        f.write(blob)
    leaves = jax.tree.leaves((params, state))
    print(f"wrote {args.out}: {len(blob) / 1e6:.1f} MB, {sum(np.size(x) for x in leaves):,} "
          f"baked-in values")


if __name__ == "__main__":
    main()
