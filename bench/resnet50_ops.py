"""Where a ResNet-50 train step's time goes, op by op, ours against PyTorch (channels-last).

    python -m bench.resnet50_ops                      # batch 8, 192 px, 5 rounds
    python -m bench.resnet50_ops --batch 8 --size 224 --rounds 7

Every distinct op of torchvision's ResNet-50 (each conv shape, each BatchNorm and ReLU size in
training mode, the max-pool, the residual adds, the head) is timed alone, forward and backward
(gradients of its input and its parameters against a fixed random cotangent): ours through the
zoo's own modules (nets.layers.Conv with this backend's lowering, nets.layers.BatchNorm) under
jax.jit, PyTorch's nn modules in eager mode. Rounds interleave every op of both frameworks;
the median round is reported, weighted by the op's count in the network. The sum is not the
step (no fusion across ops, no optimizer), but the per-class shares say where a gap lies.
"""

from __future__ import annotations

import argparse
import collections
import statistics

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from bench.timing import interleaved
from nets import layers


def resnet50_ops(size: int):
    """((kind, input H, C_in, C_out, kernel, stride), count) for torchvision's ResNet-50; kinds:
    conv, bn (C_in channels at H), relu, add, maxpool, fc."""
    ops = collections.Counter()
    h = size // 2
    ops[("conv", size, 3, 64, 7, 2)] += 1
    ops[("bn", h, 64, 64, 0, 1)] += 1
    ops[("relu", h, 64, 64, 0, 1)] += 1
    ops[("maxpool", h, 64, 64, 3, 2)] += 1
    h //= 2
    c_in = 64
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            out = h // s
            ops[("conv", h, c_in, width, 1, 1)] += 1
            ops[("bn", h, width, width, 0, 1)] += 1
            ops[("relu", h, width, width, 0, 1)] += 1
            ops[("conv", h, width, width, 3, s)] += 1
            ops[("bn", out, width, width, 0, 1)] += 1
            ops[("relu", out, width, width, 0, 1)] += 1
            ops[("conv", out, width, 4 * width, 1, 1)] += 1
            ops[("bn", out, 4 * width, 4 * width, 0, 1)] += 1
            if b == 0:
                ops[("conv", h, c_in, 4 * width, 1, s)] += 1
                ops[("bn", out, 4 * width, 4 * width, 0, 1)] += 1
            ops[("add", out, 4 * width, 4 * width, 0, 1)] += 1
            ops[("relu", out, 4 * width, 4 * width, 0, 1)] += 1
            c_in, h = 4 * width, out
    ops[("fc", h, c_in, 1000, 0, 1)] += 1
    return ops


def _jax_op(op, batch, rng):
    kind, h, c_in, c_out, k, s = op

    def forward(x):
        if kind == "conv":
            return layers.Conv(c_out, k, s)(x)
        if kind == "bn":
            return layers.BatchNorm()(x, is_training=True)
        if kind == "relu":
            return jax.nn.relu(x)
        if kind == "add":
            return x + x[::-1]
        if kind == "maxpool":
            return layers.max_pool(x, 3, 2, padding=1)
        return hk.Linear(c_out)(jnp.mean(x, axis=(1, 2)))

    f = hk.transform_with_state(forward)
    x = jnp.asarray(rng.standard_normal((batch, h, h, c_in)), jnp.float32)
    params, state = f.init(jax.random.key(0), x)
    out_shape = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x)[0], params, state, x)
    cotangent = jnp.asarray(rng.standard_normal(out_shape.shape), jnp.float32)

    def loss(params, x):
        return jnp.sum(f.apply(params, state, None, x)[0] * cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: jax.block_until_ready(grad(params, x))


def _torch_op(op, batch, rng):
    from tests import reference   # the torchvision import workaround lives there

    torch = reference.torch()
    nn = torch.nn
    kind, h, c_in, c_out, k, s = op
    module = {"conv": lambda: nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False),
              "bn": lambda: nn.BatchNorm2d(c_in), "relu": lambda: nn.ReLU(),
              "maxpool": lambda: nn.MaxPool2d(3, 2, 1),
              "add": lambda: None, "fc": lambda: nn.Linear(c_in, c_out)}[kind]()
    x = torch.from_numpy(rng.standard_normal((batch, c_in, h, h)).astype(np.float32))
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    if module is not None:
        module = module.to(memory_format=torch.channels_last).train()

    def forward():
        if kind == "add":
            return x + x.flip(0)
        if kind == "fc":
            return module(x.mean((2, 3)))
        return module(x)

    cotangent = torch.randn_like(forward())

    def run():
        x.grad = None
        if module is not None:
            module.zero_grad(set_to_none=True)
        forward().backward(cotangent)
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    ops = resnet50_ops(args.size)
    runs = {}
    for op in ops:
        runs[("jax", op)] = _jax_op(op, args.batch, rng)
        runs[("torch", op)] = _torch_op(op, args.batch, rng)
    times = interleaved(runs, args.rounds)
    ms = {key: 1e3 * statistics.median(t) for key, t in times.items()}
    print(f"ResNet-50 ops, batch {args.batch}, {args.size} px, forward + backward, median of "
          f"{args.rounds} rounds, ms x count (ours / PyTorch channels-last):")
    print("| op (kind, input px, C_in -> C_out, kernel, stride) | count | ours ms | PyTorch ms "
          "| ratio |")
    print("|---|---:|---:|---:|---:|")
    by_kind = collections.defaultdict(lambda: [0.0, 0.0])
    for op, count in ops.items():
        ours, theirs = count * ms[("jax", op)], count * ms[("torch", op)]
        kind, h, c_in, c_out, k, s = op
        label = f"{kind} {h}px {c_in}->{c_out}" + (f" {k}x{k} s{s}" if kind == "conv" else "")
        print(f"| {label} | {count} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} |")
        key = f"conv {k}x{k}" if kind == "conv" else kind
        by_kind[key][0] += ours
        by_kind[key][1] += theirs
    total = [sum(v[i] for v in by_kind.values()) for i in (0, 1)]
    print("\n| op class | ours ms | PyTorch ms | ratio | share of our total |")
    print("|---|---:|---:|---:|---:|")
    for key, (ours, theirs) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        print(f"| {key} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | "
              f"{ours / total[0]:.0%} |")
    print(f"| all | {total[0]:.1f} | {total[1]:.1f} | {total[0] / total[1]:.2f} | 100% |")


if __name__ == "__main__":
    main()
