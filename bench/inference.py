"""Inference throughput of registered models side by side, next to their FLOPs.

    python -m bench.inference --models efficientnet_b0 mobilenet_v2 resnet50
    python -m bench.inference --models efficientnet_b0 resnet50 --lowerings auto native
    python -m bench.inference --models resnet50 mobilenet_v2 --fused   # + BatchNorms folded

Each model's eval-mode forward (float32, one batch) is compiled once per conv lowering
("auto": what the conv layer picks for this backend; "native": XLA's own grouped/depthwise
convs); with --fused, also in its inference form with every BatchNorm folded into the conv
before it (`nets.fusion`). The variants are timed interleaved, round after round, so that
machine noise hits them alike. The table gives median images/s, the multiply-adds per image
(counted from the model's convs and dense layers, as the reference FLOP counts do), and
images/s x GMACs: the rate at which the model's arithmetic gets done, which is what "slower per
FLOP" compares.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import nets
from bench.timing import interleaved
from tools.summary import summary, totals


def multiply_adds(name: str, size: int, **overrides) -> int:
    """Multiply-adds of one image (one clip for video models) through the model's convs, dense
    layers and deformable convs, counted while tracing (nothing runs): `tools.summary`'s total,
    every block of a layer stack included."""
    return totals(summary(name, size, **overrides))[1]


def _forward(name: str, images, lowering: str, fused: bool = False):
    """A compiled eval forward under the given lowering (its BatchNorms folded when `fused`);
    returns a thunk that runs it and the compile time."""
    old = os.environ.get("NETS_CONV_LOWERING")
    if lowering == "native":
        os.environ["NETS_CONV_LOWERING"] = "native"
    try:
        f = nets.transformed(name)
        params, state = jax.jit(functools.partial(f.init, is_training=True))(
            jax.random.key(0), images)
        if fused:
            params, state = nets.fusion.fuse(name, params, state)
            f = nets.transformed(name, fused=True)
        apply = jax.jit(functools.partial(f.apply, is_training=False))
        start = time.perf_counter()
        compiled = apply.lower(params, state, None, images).compile()
        compile_s = time.perf_counter() - start
    finally:
        if old is None:
            os.environ.pop("NETS_CONV_LOWERING", None)
        else:
            os.environ["NETS_CONV_LOWERING"] = old

    def run():
        jax.block_until_ready(compiled(params, state, None, images))

    return run, compile_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*",
                        default=["efficientnet_b0", "mobilenet_v2", "resnet50"])
    parser.add_argument("--lowerings", nargs="*", default=["auto"], choices=["auto", "native"])
    parser.add_argument("--fused", action="store_true",
                        help="also time each model with its BatchNorms folded into its convs")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    images = jnp.asarray(np.random.default_rng(0).normal(
        size=(args.batch, args.size, args.size, 3)), jnp.float32)
    runs, compile_s, gmacs = {}, {}, {}
    for name in args.models:
        gmacs[name] = multiply_adds(name, args.size) / 1e9
        for lowering in args.lowerings:
            for fused in (False, True) if args.fused else (False,):
                key = (name, lowering, "fused" if fused else "-")
                runs[key], compile_s[key] = _forward(name, images, lowering, fused)
    times = interleaved(runs, args.rounds)

    first = next(iter(runs))
    rate = {k: args.batch / statistics.median(t) for k, t in times.items()}
    print(f"eval forward, batch {args.batch}, {args.size} px, float32, {jax.devices()[0]}, "
          f"median of {args.rounds} interleaved rounds")
    print("| model | lowering | BN | GMACs / image | images/s | ratio | GMACs/s | GMACs/s ratio "
          "| compile s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for (name, lowering, form), r in rate.items():
        print(f"| {name} | {lowering} | {form} | {gmacs[name]:.3f} | {r:.1f} | "
              f"{r / rate[first]:.2f} | {r * gmacs[name]:.1f} | "
              f"{r * gmacs[name] / (rate[first] * gmacs[first[0]]):.2f} "
              f"| {compile_s[(name, lowering, form)]:.1f} |")


if __name__ == "__main__":
    main()
