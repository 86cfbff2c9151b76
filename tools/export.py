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
    Weights fused already (`tools.fuse`) are exported as they are, with fused=True."""
    info = nets.model_info(name)
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


def load(blob: bytes):
    """A callable images -> logits from `export`'s bytes (needs only jax)."""
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
    args = parser.parse_args(argv)
    overrides = {}   # those the weights were saved with (a file's fused=True, a run's options)
    if args.weights:
        source = _read(args.name, args.weights, args.num_classes)
        overrides = dict(source.overrides) if source.model == args.name else {}
        params, state = weight_sources.variables(source, args.name, args.num_classes)
    else:
        params, state = load_variables(args.name, None, args.num_classes, args.seed)
    fused = args.fused or overrides.pop("fused", False)
    blob = export(args.name, params, state, args.num_classes, args.size,
                  tuple(args.platforms) if args.platforms else None, fused=fused, **overrides)
    with open(args.out, "wb") as f:
        f.write(blob)
    leaves = jax.tree.leaves((params, state))
    print(f"wrote {args.out}: {len(blob) / 1e6:.1f} MB, {sum(np.size(x) for x in leaves):,} "
          f"baked-in values")


if __name__ == "__main__":
    main()
