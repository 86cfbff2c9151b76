"""Where a train step's time goes: XLA's own per-instruction times from the JAX profiler.

    python -m bench.step_profile --model resnet50                  # batch 8, 192 px, SGD
    python -m bench.step_profile --model nfnet_f0 --agc --size 128 --batch 4

The step is bench.train_step's. Each HLO instruction or fusion the runtime executes (a "thunk"
on XLA:CPU) is timed over --steps steps; the table sums them by kind, the instruction's name
without its number: on XLA:CPU `ynn_fusion` is a dot or conv run by the YNNPACK library,
`copy_*` and `transpose_*` fusions write a tensor in another layout, `*_reduce_*` fusions are
reductions (BatchNorm's statistics), the rest elementwise fusions. Kinds show what XLA made of
the model, e.g. the 36 `copy_bitcast_fusion`s that were 17% of a ResNet-50 step (BENCHMARKS.md).
Instructions run concurrently on several cores, so the times sum to more than the step's wall
time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.train_step import _jax_step, _model, _nfnet_optimizer


def thunk_times(trace_dir: str) -> dict[str, float]:
    """Microseconds per executed HLO instruction, summed over the trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as file:
        events = json.load(file)["traceEvents"]
    times = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and "hlo_op" in event.get("args", {}):
            times[event["args"]["hlo_op"]] += event.get("dur", 0.0)
    return times


def kind(instruction: str) -> str:
    return re.sub(r"\.\d+$", "", instruction)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--agc", action="store_true", help="the NFNet optimizer (SGD-AGC)")
    parser.add_argument("--top", type=int, default=15, help="largest single instructions shown")
    args = parser.parse_args(argv)

    name, f, _ = _model(args.model)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, args.batch))
    run, compile_s, _ = _jax_step(f, images, labels, _nfnet_optimizer(name) if args.agc else None)
    for _ in range(2):
        run()
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                start = time.perf_counter()
                run()
                walls.append(time.perf_counter() - start)
        times = thunk_times(trace_dir)

    per_step = {op: t / args.steps / 1e3 for op, t in times.items()}     # ms
    by_kind, count = collections.Counter(), collections.Counter()
    for op, ms in per_step.items():
        by_kind[kind(op)] += ms
        count[kind(op)] += 1
    total = sum(by_kind.values())
    print(f"{args.model} train step, batch {args.batch}, {args.size} px, "
          f"{'SGD-AGC' if args.agc else 'SGD'}, {jax.devices()[0]}: wall "
          f"{statistics.median(walls) * 1e3:.0f} ms (median of {args.steps}, traced), "
          f"instructions {total:.0f} ms, compile {compile_s:.1f} s")
    print("| kind | ms per step | share | instructions |")
    print("|---|---:|---:|---:|")
    for key, ms in by_kind.most_common():
        if ms >= 0.001 * total:
            print(f"| {key} | {ms:.1f} | {ms / total:.1%} | {count[key]} |")
    print("\nlargest instructions: " + ", ".join(
        f"{op} {ms:.1f} ms" for op, ms in collections.Counter(per_step).most_common(args.top)))


if __name__ == "__main__":
    main()
