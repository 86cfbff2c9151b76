"""The design notes' point head (efficientdet_spec.md §18, issue 20): the registry row, the head's
parameters in closed form, detection.keypoints' encoder (round trip, collisions), its loss
against a NumPy computation, and a small keypoint model that overfits a few images."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
from detection import keypoints as kp
from tests.helpers import count, reference_figures

NAME = "efficientdet_d0_keypoints"


def test_the_row_is_d0_with_the_point_head():
    info, d0 = nets.model_info(NAME), nets.model_info("efficientdet_d0")
    meta = info.task_metadata
    assert info.task == "keypoints" and info.reference.startswith("paper:")
    assert info.reference_params is None  # no reference implementation to count
    assert (meta["levels"], meta["points_per_cell"], meta["num_classes"]) == ((3,), 1, 1)
    assert info.config["points_per_cell"] == meta["points_per_cell"]
    assert {k: v for k, v in info.config.items() if k != "points_per_cell"} == {
        k: v for k, v in d0.config.items() if k != "num_anchors"}


@pytest.mark.parametrize("num_classes, points_per_cell", [(1, 1), (3, 2)])
def test_head_parameters_are_the_closed_form(num_classes, points_per_cell):
    """Spec §15.1 with one "anchor" per slot: class side R(W^2 + 10W) + 2RLW + sep(W -> PK),
    point side the same with 2P outputs, sep(a -> b) = 9a + ab + b; backbone and BiFPN are D0's
    official figures."""
    def forward(images):
        with nets.registry.zero_init():
            return nets.create(NAME, num_classes, points_per_cell=points_per_cell)(
                images, is_training=True)

    params, _ = jax.eval_shape(hk.transform_with_state(forward).init, jax.random.key(0),
                               nets.introspect.example_images(NAME, 1, 128))
    width, repeats, levels = 64, 3, 5

    def head(outputs):
        return (repeats * (width ** 2 + 10 * width) + repeats * levels * 2 * width
                + 9 * width + width * outputs + outputs)

    def part(prefix):
        return count({m: v for m, v in params.items() if m.startswith(f"efficientdet/{prefix}")})

    assert part("class_net") == head(points_per_cell * num_classes)
    assert part("point_net") == head(points_per_cell * 2)
    assert part("box_net") == 0
    official = reference_figures("efficientdet_official.json")["variants"]["D0"]["params"]
    assert part("backbone") + part("fpn") == official["backbone"] + official["bifpn"]
    if (num_classes, points_per_cell) == (1, 1):  # spec §18's D0 figures
        assert head(1) == 16_128 + 576 + 65 and head(2) == 16_128 + 576 + 130


def _distant_points(rng, count, size, stride, min_cells=2):
    """`count` points in [0, size) whose cells are at least `min_cells` apart (Chebyshev)."""
    points = []
    while len(points) < count:
        p = rng.uniform(0, size, 2)
        if all(np.abs(np.floor(p / stride) - np.floor(q / stride)).max() >= min_cells
               for q in points):
            points.append(p)
    return np.asarray(points, np.float32)


def test_encode_then_decode_is_the_cell_arithmetic():
    rng = np.random.RandomState(0)
    points = _distant_points(rng, 6, 64, 8)
    points[0] = (16.0, 40.0)  # on cell corners: offset 0
    classes = np.array([0, 1, 2, 0, 1, 2], np.int32)
    padded_points = np.concatenate([points, np.zeros((3, 2), np.float32)])
    padded_classes = np.concatenate([classes, -np.ones(3, np.int32)])
    t = kp.encode_points(padded_points, padded_classes, (8, 8), 8, 1, 3)
    assert (int(t.num_points), int(t.num_dropped)) == (6, 0)
    cells = np.floor(points / 8).astype(int)
    assert np.array_equal(np.argwhere(np.asarray(t.mask)[..., 0]),
                          cells[np.lexsort((cells[:, 1], cells[:, 0]))])
    assert np.array_equal(np.asarray(t.presence)[cells[:, 0], cells[:, 1], 0],
                          np.eye(3)[classes])
    # exact: power-of-two strides keep every step of (i + (y / s - i)) * s exact
    positions = np.asarray(kp.cell_positions(t.offsets, 8))
    assert np.array_equal(positions[cells[:, 0], cells[:, 1], 0], points)

    # the decoder, fed logits that reproduce the targets
    class_logits = jnp.where(t.presence > 0, 10.0, -10.0).reshape(1, 8, 8, 3)
    point_logits = jax.scipy.special.logit(t.offsets).reshape(1, 8, 8, 2)
    out = kp.decode_keypoints([class_logits], [point_logits], [8], 1, max_points=10)
    assert int(out.valid.sum()) == 6 and not out.valid[0, 6:].any()
    found = sorted(zip(out.classes[0, :6].tolist(), out.points[0, :6].tolist()))
    expected = sorted(zip(classes.tolist(), points.tolist()))
    assert [c for c, _ in found] == [c for c, _ in expected]
    np.testing.assert_allclose([p for _, p in found], [p for _, p in expected], atol=1e-4)
    assert out.classes[0, 6:].tolist() == [-1] * 4


def test_points_sharing_a_cell_take_its_slots_in_raster_order_the_rest_are_counted():
    # three points in cell (1, 2) of a stride-8 grid, listed out of raster order, one outside
    # the image, one padding row
    points = np.array([[12.0, 20.0], [9.0, 22.0], [9.0, 17.0], [70.0, 3.0], [0.0, 0.0]],
                      np.float32)
    classes = np.array([0, 1, 0, 1, -1], np.int32)
    one = kp.encode_points(points, classes, (8, 8), 8, 1, 2)
    assert (int(one.num_points), int(one.num_dropped)) == (1, 3)
    np.testing.assert_array_equal(one.offsets[1, 2, 0], [9 / 8 - 1, 17 / 8 - 2])  # (9, 17)
    assert one.presence[1, 2, 0].tolist() == [1.0, 0.0]
    two = kp.encode_points(points, classes, (8, 8), 8, 2, 2)
    assert (int(two.num_points), int(two.num_dropped)) == (2, 2)
    assert two.mask[1, 2].tolist() == [True, True] and int(two.mask.sum()) == 2
    np.testing.assert_array_equal(two.offsets[1, 2, 1], [9 / 8 - 1, 22 / 8 - 2])  # (9, 22)
    assert two.presence[1, 2].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # the same point twice: two slots
    same = kp.encode_points(points[[0, 0]], np.array([0, 0]), (8, 8), 8, 2, 2)
    assert (int(same.num_points), same.mask[1, 2].tolist()) == (2, [True, True])


def test_loss_is_the_numpy_computation():
    """Focal (alpha 0.25, gamma 1.5) over every slot and class, BCE minus the target's entropy
    on the offsets of filled slots, both over (points + 1)."""
    rng = np.random.RandomState(1)
    batch, grid, slots, num_classes = 2, (2, 3), 2, 2
    points = np.array([[[1.0, 2.0], [3.0, 7.0], [1.5, 2.5]],
                       [[5.0, 11.0], [0.0, 0.0], [0.0, 0.0]]], np.float32)
    classes = np.array([[0, 1, 1], [1, -1, -1]], np.int32)
    targets = kp.encode_batch(points, classes, [grid], [4], slots, num_classes)
    cls = rng.randn(batch, *grid, slots * num_classes).astype(np.float32)
    pts = rng.randn(batch, *grid, slots * 2).astype(np.float32)
    loss = kp.keypoint_loss([cls], [pts], targets, slots)

    y = np.asarray(targets[0].presence).reshape(cls.shape)
    p = 1 / (1 + np.exp(-cls.astype(np.float64)))
    p_t = np.where(y == 1, p, 1 - p)
    focal = np.where(y == 1, 0.25, 0.75) * (1 - p_t) ** 1.5 * -np.log(p_t)
    o = np.asarray(targets[0].offsets, np.float64).reshape(pts.shape)
    q = 1 / (1 + np.exp(-pts.astype(np.float64)))
    with np.errstate(divide="ignore", invalid="ignore"):
        bce = -(o * np.log(q) + (1 - o) * np.log(1 - q))
        entropy = -np.nan_to_num(o * np.log(o)) - np.nan_to_num((1 - o) * np.log(1 - o))
    filled = np.repeat(np.asarray(targets[0].mask), 2, axis=-1)
    normalizer = 4 + 1  # the four points all get a slot
    assert int(sum(t.num_points.sum() for t in targets)) == 4
    np.testing.assert_allclose(loss.presence, focal.sum() / normalizer, rtol=1e-5)
    np.testing.assert_allclose(loss.offset, (bce - entropy)[filled].sum() / normalizer,
                               rtol=1e-5)
    np.testing.assert_allclose(loss.total, loss.presence + loss.offset, rtol=1e-6)
    perfect = jax.scipy.special.logit(targets[0].offsets).reshape(pts.shape)
    assert float(kp.keypoint_loss([cls], [perfect], targets, slots).offset) == pytest.approx(
        0.0, abs=1e-6)


def _images(points, classes, size):
    """A Gaussian dot (sigma 1.5 px) per point, in the colour channel of its class."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32) + 0.5
    images = np.zeros((len(points), size, size, 3), np.float32)
    for b, (pts, cls) in enumerate(zip(points, classes)):
        for (y, x), c in zip(pts, cls):
            if c >= 0:
                images[b, ..., c] += np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5 ** 2))
    return (images - 0.1) / 0.3


def test_a_small_keypoint_model_overfits_a_few_images(monkeypatch):
    """4 images of 64 px with 1-3 points of 2 classes: a reduced model (B0 at width 0.25 and
    one block per stage, BiFPN 16 wide, one cell, levels 3-5), adam, 150 steps under jit, finds
    every point within 1 px with its class, and nothing else. Decoded with the batch's
    BatchNorm statistics, as trained: 150 steps do not settle the running averages, and what is
    tested is the head, the loss and the decoder."""
    monkeypatch.setenv("NETS_CONV_LOWERING", "native")  # faster XLA:CPU compiles
    size, stride, num_classes, steps = 64, 8, 2, 150
    level = nets.model_info(NAME).task_metadata["levels"][0] - 3
    rng = np.random.RandomState(0)
    points = np.zeros((4, 3, 2), np.float32)
    classes = -np.ones((4, 3), np.int32)
    for b, n in enumerate([1, 2, 3, 3]):
        points[b, :n] = _distant_points(rng, n, size, stride)
        classes[b, :n] = rng.randint(0, num_classes, n)
    images = jnp.asarray(_images(points, classes, size))
    targets = kp.encode_batch(points, classes, [(size // stride,) * 2], [stride], 1,
                              num_classes)
    f = nets.transformed(NAME, num_classes, backbone=(0.25, 0.1), fpn_width=16, fpn_cells=1,
                         head_repeats=1, max_level=5)
    optimizer = optax.adam(3e-3)

    def forward(params, state):
        out, state = f.apply(params, state, None, images, is_training=True)
        return [out["class"][level]], [out["point"][level]], state

    def step(carry, _):
        def loss_fn(params, state):
            cls, pts, state = forward(params, state)
            return kp.keypoint_loss(cls, pts, targets, 1).total, state

        params, state, opt_state = carry
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), loss

    @jax.jit  # init, training and decoding in one program: one compile
    def fit(key):
        params, state = f.init(key, images, is_training=True)
        (params, state, _), losses = jax.lax.scan(
            step, (params, state, optimizer.init(params)), None, length=steps)
        cls, pts, _ = forward(params, state)
        return losses, kp.decode_keypoints(cls, pts, [stride], 1, max_points=8)

    losses, found = fit(jax.random.key(0))
    assert float(losses[-1]) < 0.01 * float(losses[0])
    for b in range(4):
        n = int((classes[b] >= 0).sum())
        assert int(found.valid[b].sum()) == n, (b, found.scores[b])
        for point, cls in zip(points[b, :n], classes[b, :n]):
            dist = np.abs(np.asarray(found.points[b, :n]) - point).max(axis=-1)
            match = int(np.argmin(dist))
            assert dist[match] < 1.0 and int(found.classes[b, match]) == cls, (b, point, dist)
