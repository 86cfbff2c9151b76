"""Train-step time of registered models, side by side with reference implementations.

    python -m bench.train_step --models resnet50 --haiku-resnet50 --torch resnet50

Each step is forward, backward and an SGD-momentum update at float32 on one batch. The
implementations are timed interleaved (one step of each, round after round) so that machine
noise hits them alike; the table gives medians and ratios to the first row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets


def _jax_step(f, images, labels):
    """A compiled train step of a transformed-with-state model; returns a thunk running one."""
    params, state = f.init(jax.random.key(0), images, is_training=True)
    optimizer = optax.sgd(0.01, momentum=0.9)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, state, opt_state):
        def loss_fn(params):
            logits, state_ = f.apply(params, state, None, images, is_training=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state_

        (loss, state_), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state_, opt_state, loss

    carry = [params, state, opt_state]
    start = time.perf_counter()
    jax.block_until_ready(step.lower(*carry).compile())
    compile_s = time.perf_counter() - start

    def run():
        *carry[:], loss = step(*carry)
        jax.block_until_ready(loss)

    return run, compile_s


def haiku_resnet50(num_classes):
    def forward(images, is_training):
        return hk.nets.ResNet50(num_classes)(images, is_training=is_training)
    return hk.transform_with_state(forward)


def _torch_step(name, batch, size, num_classes):
    sys.path.insert(0, "tests")
    from tests import reference  # the torchvision import workaround lives there

    torch = reference.torch()
    model = getattr(reference.torchvision().models, name)(num_classes=num_classes)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,))

    def run():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    start = time.perf_counter()
    run()
    return run, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["resnet50"])
    parser.add_argument("--haiku-resnet50", action="store_true",
                        help="also time Haiku's own hk.nets.ResNet50")
    parser.add_argument("--torch", nargs="*", default=[],
                        help="torchvision model names to time (channels-last)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, args.batch))
    runs, compile_s = {}, {}
    for name in args.models:
        runs[name], compile_s[name] = _jax_step(nets.transformed(name), images, labels)
    if args.haiku_resnet50:
        runs["hk.nets.ResNet50"], compile_s["hk.nets.ResNet50"] = _jax_step(
            haiku_resnet50(1000), images, labels)
    for name in args.torch:
        runs[f"torch {name}"], compile_s[f"torch {name}"] = _torch_step(
            name, args.batch, args.size, 1000)

    times = {k: [] for k in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(args.rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)

    first = statistics.median(times[next(iter(times))])
    print(f"train step, batch {args.batch}, {args.size} px, float32, {jax.devices()[0]}, "
          f"median of {args.rounds} interleaved rounds")
    print("| implementation | step s (median) | ratio to first row | compile s |")
    print("|---|---:|---:|---:|")
    for key, values in times.items():
        median = statistics.median(values)
        print(f"| {key} | {median:.3f} | {median / first:.2f} | {compile_s[key]:.1f} |")


if __name__ == "__main__":
    main()
