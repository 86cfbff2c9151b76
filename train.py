"""Trains a registered model.

Until the full training program lands (train state, configs, sharded steps, checkpoints, the
built-in dataset), this trains any registered model on a small synthetic task that needs no
download - four classes of 32x32 images (horizontal stripes, vertical stripes, checkerboard,
a bright disc) under random phase, colour and noise - and ends by printing test accuracy.

    python train.py --model resnet18 --steps 60
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np
import optax

import nets


def synthetic_images(n: int, size: int, rng: np.random.Generator):
    labels = rng.integers(0, 4, n)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(4, 10, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    patterns = np.stack([
        np.sin(2 * np.pi * yy / period + phase),
        np.sin(2 * np.pi * xx / period + phase),
        np.sin(2 * np.pi * xx / period + phase) * np.sin(2 * np.pi * yy / period + phase),
        2.0 * (np.hypot(yy - rng.uniform(8, size - 8, (n, 1, 1)),
                        xx - rng.uniform(8, size - 8, (n, 1, 1))) < size / 5) - 1,
    ])[labels, np.arange(n)]
    colour = rng.uniform(0.3, 1.0, (n, 1, 1, 3))
    images = patterns[..., None] * colour + rng.normal(0, 0.5, (n, size, size, 3))
    return images.astype(np.float32), labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", help="a name from nets.list_models()")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    train_x, train_y = synthetic_images(2048, args.size, rng)
    test_x, test_y = synthetic_images(512, args.size, rng)

    model = nets.transformed(args.model, num_classes=4)
    params, state = model.init(jax.random.key(args.seed), train_x[:2], is_training=True)
    schedule = optax.cosine_decay_schedule(args.lr, args.steps)
    optimizer = optax.chain(optax.add_decayed_weights(5e-5),
                            optax.sgd(schedule, momentum=0.9, nesterov=True))
    opt_state = optimizer.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, state, opt_state, rng, images, labels):
        def loss_fn(params):
            logits, new_state = model.apply(params, state, rng, images, is_training=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, new_state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    @jax.jit
    def predict(params, state, images):
        return model.apply(params, state, None, images, is_training=False)[0].argmax(-1)

    print(f"training {args.model} ({nets.convert.count_params(args.model, 4):,} parameters) "
          f"for {args.steps} steps of {args.batch} on {jax.devices()[0].platform}")
    start, key = time.time(), jax.random.key(args.seed + 1)
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, len(train_x), args.batch)
        params, state, opt_state, loss = train_step(
            params, state, opt_state, jax.random.fold_in(key, step), train_x[idx], train_y[idx])
        if step % 25 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {float(loss):.4f}  {time.time() - start:6.1f}s")
    correct = sum(int((predict(params, state, test_x[i:i + 256]) == test_y[i:i + 256]).sum())
                  for i in range(0, len(test_x), 256))
    print(f"test accuracy {correct / len(test_x):.3f} ({len(test_x)} images, 4 classes)")


if __name__ == "__main__":
    main()
