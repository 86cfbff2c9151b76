"""Forward + backward time of single ops under each conv lowering on this backend.

    python -m bench.conv_lowering            # one op
    python -m bench.conv_lowering --in-scan  # five ops in a row, unrolled and under lax.scan

The "cpu" lowering (1x1 convs as matmuls, grouped convs split per group, depthwise convs as
shifted multiply-adds) and the "cpu_loop" lowering (the same forward, gradients as shifted
matmuls, for bodies of scans) against XLA's native convolution; outputs are equal
(tests/test_layers.py).
"""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nets import layers

CASES = {
    # name: (input NHWC, kernel HWIO, stride, groups)
    "1x1 256->64, 8x48x48": ((8, 48, 48, 256), (1, 1, 256, 64), 1, 1),
    "3x3 dense 64->64, 8x48x48": ((8, 48, 48, 64), (3, 3, 64, 64), 1, 1),
    "3x3 grouped 128 G32, 8x28x28": ((8, 28, 28, 128), (3, 3, 4, 128), 1, 32),
    "3x3 grouped 768 G6, 8x12x12": ((8, 12, 12, 768), (3, 3, 128, 768), 1, 6),
    "3x3 depthwise 144, 8x56x56": ((8, 56, 56, 144), (3, 3, 1, 144), 1, 144),
    "7x7 stem 3->64 s2, 8x192x192": ((8, 192, 192, 3), (7, 7, 3, 64), 2, 1),
}


def _time(fn, *args, rounds=5):
    grad = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.square(fn(x, w))), (0, 1)))
    jax.block_until_ready(grad(*args))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(grad(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


SCAN_CASES = {
    "3x3 dense 768->768, 8x12x12": ((8, 12, 12, 768), (3, 3, 768, 768), 1),
    "3x3 grouped 768 G6, 8x12x12 (NFNet)": ((8, 12, 12, 768), (3, 3, 128, 768), 6),
    "1x1 768->768, 8x12x12": ((8, 12, 12, 768), (1, 1, 768, 768), 1),
}


def _time_chain(lowering, x, w, groups, scanned, rounds=3):
    """Five residual layers x + tanh(conv(x, w_i)): gradient w.r.t. all weights and x."""
    op = lambda x, w: x + jnp.tanh(layers.conv(x, w, padding="same", groups=groups,
                                               lowering=lowering))

    def loss(w, x):
        if scanned:
            return jnp.sum(jax.lax.scan(lambda x, wi: (op(x, wi), None), x, w)[0])
        for i in range(w.shape[0]):
            x = op(x, w[i])
        return jnp.sum(x)

    grad = jax.jit(jax.grad(loss, (0, 1)))
    jax.block_until_ready(grad(w, x))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(grad(w, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def in_scan():
    rng = np.random.default_rng(0)
    print(f"five layers forward + backward, ms, median of 3, {jax.devices()[0]}")
    print("| op | lowering | unrolled | under lax.scan |")
    print("|---|---|---:|---:|")
    for name, (x_shape, w_shape, groups) in SCAN_CASES.items():
        x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
        w = jnp.asarray(rng.normal(size=(5, *w_shape)) * 0.01, jnp.float32)
        for lowering in ("native", "cpu", "cpu_loop"):
            if groups > 1 and lowering == "native":
                continue  # the grouped native weight gradient alone takes seconds (table above)
            times = [_time_chain(lowering, x, w, groups, s) for s in (False, True)]
            print(f"| {name} | {lowering} | {times[0]:.0f} | {times[1]:.0f} |")


def main():
    if "--in-scan" in sys.argv:
        return in_scan()
    rng = np.random.default_rng(0)
    print(f"forward + backward (dx, dw), ms, median of 5, {jax.devices()[0]}")
    print("| op | native | cpu lowering | speed-up |")
    print("|---|---:|---:|---:|")
    for name, (x_shape, w_shape, stride, groups) in CASES.items():
        x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
        w = jnp.asarray(rng.normal(size=w_shape) * 0.1, jnp.float32)
        t = {lowering: _time(lambda x, w, lowering=lowering, stride=stride, groups=groups:
                             layers.conv(x, w, stride=stride, groups=groups, lowering=lowering),
                             x, w)
             for lowering in ("native", "cpu")}
        print(f"| {name} | {t['native']:.1f} | {t['cpu']:.1f} | {t['native'] / t['cpu']:.1f}x |")
    x = jax.nn.relu(jnp.asarray(rng.normal(size=(8, 96, 96, 64)), jnp.float32))
    t = {lowering: _time(lambda x, w, lowering=lowering:
                         layers.max_pool(x, 3, 2, 1, lowering) * w, x, 1.0)
         for lowering in ("native", "cpu")}
    print(f"| max-pool 3x3/2 after ReLU, 8x96x96x64 | {t['native']:.1f} | {t['cpu']:.1f} | "
          f"{t['native'] / t['cpu']:.1f}x |")


if __name__ == "__main__":
    main()
