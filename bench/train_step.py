"""Train-step time, compile time and memory of registered models, side by side with reference
implementations.

    python -m bench.train_step --models resnet50 --haiku-resnet50 --torch resnet50
    python -m bench.train_step --models resnet50 nfnet_f0 --agc
    python -m bench.train_step --models nfnet_f0 nfnet_f7 --size 64 --batch 2 --rounds 0
    python -m bench.train_step --models nfnet_f1 nfnet_f1:remat --size 224 --rounds 0

Each step is forward, backward and an update at float32 on one batch: SGD with momentum, or
with --agc the NFNet optimizer (AGC + weight decay + Nesterov SGD) for our models. A model
name may end in ":remat" (rematerialised blocks), ":unrolled" (NFNet blocks not scanned) or
":dcn" (ResNet family: deformable 3x3 convs in stage 4).
Video models (P3D) get clips of their registered length at the same size. The MACs ratio is
the model's multiply-adds per example over the first row's (convs and dense layers, counted
while tracing: `bench.inference.multiply_adds`).
The implementations are timed interleaved (one step of each, round after round) so that
machine noise hits them alike; the table gives medians and ratios to the first row, the
compile time of the step and XLA's memory estimate.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nets
import optim
from bench.inference import multiply_adds
from bench.timing import interleaved


def _jax_step(f, images, labels, optimizer=None):
    """A compiled train step; returns (thunk running one step, compile seconds, memory)."""
    params, state = jax.jit(functools.partial(f.init, is_training=True))(
        jax.random.key(0), images)
    optimizer = optimizer(params) if optimizer else optax.sgd(0.01, momentum=0.9)
    opt_state = optimizer.init(params)
    rng = jax.random.key(1)

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, state, opt_state):
        def loss_fn(params):
            logits, state_ = f.apply(params, state, rng, images, is_training=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state_

        (loss, state_), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state_, opt_state, loss

    carry = [params, state, opt_state]
    start = time.perf_counter()
    compiled = step.lower(*carry).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def run():
        *carry[:], loss = compiled(*carry)
        jax.block_until_ready(loss)

    return run, compile_s, memory


MODEL_OPTIONS = {"": {}, "remat": {"remat": True}, "unrolled": {"scan_blocks": False},
                 "dcn": {"deformable_stages": (4,)}}


def _model(spec: str):
    name, _, option = spec.partition(":")
    if option not in MODEL_OPTIONS:
        raise SystemExit(f"unknown model option {option!r} in {spec!r}; known: "
                         f"{', '.join(o for o in MODEL_OPTIONS if o)}")
    return name, nets.transformed(name, **MODEL_OPTIONS[option]), MODEL_OPTIONS[option]


def _nfnet_optimizer(name):
    def make(params):
        return optim.nfnet_optimizer(nets.param_roles(name, params), 0.01,
                                     stacked=nets.stacked_axes(name, params),
                                     decay_roles=(nets.registry.WEIGHT,
                                                  nets.registry.CLASSIFIER_WEIGHT),
                                     classifier_roles=nets.registry.CLASSIFIER_ROLES)
    return make


def haiku_resnet50(num_classes):
    def forward(images, is_training):
        return hk.nets.ResNet50(num_classes)(images, is_training=is_training)
    return hk.transform_with_state(forward)


def _torch_step(name, batch, size, num_classes):
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
    return run, time.perf_counter() - start, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["resnet50"])
    parser.add_argument("--haiku-resnet50", action="store_true",
                        help="also time Haiku's own hk.nets.ResNet50")
    parser.add_argument("--torch", nargs="*", default=[],
                        help="torchvision model names to time (channels-last)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=7,
                        help="timed rounds; 0 compiles and reports compile time and memory")
    parser.add_argument("--agc", action="store_true",
                        help="our models train with the NFNet optimizer (SGD-AGC)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, args.batch))
    runs, compile_s, memory, macs = {}, {}, {}, {}
    for spec in args.models:
        name, f, options = _model(spec)
        optimizer = _nfnet_optimizer(name) if args.agc else None
        example = nets.introspect.example_images(name, args.batch, args.size)  # clips for video
        inputs = images if example.shape == images.shape else jnp.asarray(
            rng.normal(size=example.shape), jnp.float32)
        runs[spec], compile_s[spec], memory[spec] = _jax_step(f, inputs, labels, optimizer)
        macs[spec] = multiply_adds(name, args.size, **options)
    if args.haiku_resnet50:
        key = "hk.nets.ResNet50"
        runs[key], compile_s[key], memory[key] = _jax_step(haiku_resnet50(1000), images, labels)
    for name in args.torch:
        key = f"torch {name}"
        runs[key], compile_s[key], memory[key] = _torch_step(name, args.batch, args.size, 1000)

    times = interleaved(runs, args.rounds)

    first = next(iter(runs))
    print(f"train step, batch {args.batch}, {args.size} px, float32, "
          f"{'SGD-AGC' if args.agc else 'SGD'}, {jax.devices()[0]}, "
          f"median of {args.rounds} interleaved rounds")
    print("| implementation | step s (median) | step ratio | MACs ratio | compile s "
          "| compile ratio | XLA temp memory GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key in runs:
        step = statistics.median(times[key]) if times[key] else float("nan")
        ratio = step / statistics.median(times[first]) if times[key] else float("nan")
        temp = (f"{memory[key].temp_size_in_bytes / 2**30:.2f}" if memory[key] is not None
                else "-")
        mac_ratio = f"{macs[key] / macs[first]:.2f}" if key in macs and first in macs else "-"
        print(f"| {key} | {step:.3f} | {ratio:.2f} | {mac_ratio} | {compile_s[key]:.1f} | "
              f"{compile_s[key] / compile_s[first]:.2f} | {temp} |")


if __name__ == "__main__":
    main()
