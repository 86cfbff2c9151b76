"""EfficientDet inference and train-step time, ours (jit, XLA) against effdet's PyTorch model of
the same variant on the same CPU.

    python -m bench.detection                          # D0 at 512 px: inference and a train step
    python -m bench.detection --model efficientdet_d1 --batch 1 --rounds 3

Inference is the eval-mode forward to the raw per-level class and box outputs (what effdet's
model returns); a third row adds our post-processing (pre-NMS top-k 5000, per-class soft NMS,
top 100: `detection.generate_detections`), which effdet runs through torchvision's compiled
NMS op, unavailable next to the CPU build of torch here. The train step is forward, target
assignment of the same padded ground truth (ours: jnp inside the jitted step; effdet: its
AnchorLabeler in the forward), focal + Huber loss, backward and an SGD-momentum update, float32.
Rows are timed interleaved, round after round, and reported as medians and images/s.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import detection
import nets
from bench.timing import interleaved


def _anchors(name: str, size: int):
    meta = nets.model_info(name).task_metadata
    return detection.generate_anchors(size, meta["min_level"], meta["max_level"],
                                      meta["num_scales"], meta["aspect_ratios"],
                                      meta["anchor_scale"])


def _ours(name: str, images, boxes, labels):
    """{row: (thunk, compile s)} for our inference, inference + post-processing, train step."""
    meta = nets.model_info(name).task_metadata
    num_classes = meta["num_classes"]
    anchors = jnp.asarray(_anchors(name, images.shape[1]))
    f = nets.transformed(name)
    params, state = jax.jit(functools.partial(f.init, is_training=True))(
        jax.random.key(0), images)

    def forward(params, state, images):
        return f.apply(params, state, None, images, is_training=False)[0]

    def detect(params, state, images):
        out = forward(params, state, images)
        return detection.generate_detections(out["class"], out["box"], anchors, num_classes,
                                             jnp.ones(images.shape[0]))

    optimizer = optax.sgd(0.01, momentum=0.9)

    def train(params, state, opt_state, images, boxes, labels):
        def loss_fn(params):
            out, state_ = f.apply(params, state, None, images, is_training=True)
            targets = detection.assign_targets_batch(anchors, boxes, labels)
            loss = detection.detection_loss(out["class"], out["box"], targets, num_classes)
            return loss.total, state_

        (loss, state_), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state_, opt_state, loss

    rows = {}
    for key, fn in (("ours: forward", forward), ("ours: forward + post-processing", detect)):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(params, state, images).compile()
        rows[key] = ((lambda c=compiled: jax.block_until_ready(c(params, state, images))),
                     time.perf_counter() - start)

    # The step donates its carry: its own copies, the inference rows keep theirs.
    carry = [*jax.tree.map(jnp.copy, (params, state)), optimizer.init(params)]
    start = time.perf_counter()
    step = jax.jit(train, donate_argnums=(0, 1, 2)).lower(*carry, images, boxes,
                                                           labels).compile()
    compile_s = time.perf_counter() - start

    def run_step():
        *carry[:], loss = step(*carry, images, boxes, labels)
        jax.block_until_ready(loss)

    rows["ours: train step"] = (run_step, compile_s)
    return rows


def _effdet(name: str, images, boxes, labels):
    """The same three kinds of row for effdet's `tf_` model of the variant (no
    post-processing row: see the module docstring)."""
    from tests import reference  # the torchvision / TorchScript import workarounds live there

    torch, effdet = reference.torch(), reference.effdet()
    variant = "tf_" + name
    config = effdet.get_efficientdet_config(variant)
    config.image_size = tuple(images.shape[1:3])
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
    target = {"bbox": torch.from_numpy(np.array(boxes)),
              "cls": torch.from_numpy(np.array(labels)).float()}
    rows = {}
    for layout, fmt in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
        model = effdet.create_model_from_config(config, pretrained=False,
                                                pretrained_backbone=False).eval()
        model = model.to(memory_format=fmt)
        xs = x.contiguous(memory_format=fmt)

        def forward(model=model, xs=xs):
            with torch.no_grad():
                model(xs)

        start = time.perf_counter()
        forward()
        rows[f"effdet {layout}: forward"] = (forward, time.perf_counter() - start)

    bench = effdet.DetBenchTrain(effdet.create_model_from_config(
        config, pretrained=False, pretrained_backbone=False)).train()
    optimizer = torch.optim.SGD(bench.parameters(), lr=0.01, momentum=0.9)

    def train():
        optimizer.zero_grad(set_to_none=True)
        bench(x, target)["loss"].backward()
        optimizer.step()

    start = time.perf_counter()
    train()
    rows["effdet NCHW: train step"] = (train, time.perf_counter() - start)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientdet_d0")
    parser.add_argument("--size", type=int, default=0, help="input px (0: the variant's)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per image")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-effdet", action="store_true", help="time ours only")
    args = parser.parse_args(argv)

    info = nets.model_info(args.model)
    if info.task != "detection":
        raise SystemExit(f"{args.model} is not a detector (task {info.task!r})")
    size = args.size or info.task_metadata["image_size"]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, size, size, 3)), jnp.float32)
    corner = rng.uniform(0, 0.7 * size, (args.batch, args.boxes, 2))
    extent = rng.uniform(0.05 * size, 0.3 * size, (args.batch, args.boxes, 2))
    boxes = jnp.asarray(np.concatenate([corner, corner + extent], -1), jnp.float32)
    labels = jnp.asarray(rng.integers(1, 91, (args.batch, args.boxes)), jnp.int32)

    rows = _ours(args.model, images, boxes, labels)
    if not args.no_effdet:
        rows.update(_effdet(args.model, images, boxes, labels))
    times = interleaved({k: run for k, (run, _) in rows.items()}, args.rounds)

    print(f"{args.model}, batch {args.batch}, {size} px, float32, {args.boxes} boxes per image, "
          f"{jax.devices()[0]}, median of {args.rounds} interleaved rounds")
    print("| implementation | s per batch (median) | images/s | compile / first call s |")
    print("|---|---:|---:|---:|")
    for key, (_, first) in rows.items():
        median = statistics.median(times[key])
        print(f"| {key} | {median:.3f} | {args.batch / median:.2f} | {first:.1f} |")


if __name__ == "__main__":
    main()
