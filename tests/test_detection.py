"""detection/ against efficientdet_spec.md (§9-§15.2, §19), effdet 0.4.1 (anchors, AnchorLabeler,
loss_fn), TensorFlow's NonMaxSuppressionV5 and NumPy re-derivations of the official formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import detection
from tests import reference

# Small pyramid for the reference comparisons: 128 px, P3-P7 (16, 8, 4, 2, 1 cells), 3069 anchors.
SIZE = 128
NUM_CLASSES = 10


def _effdet_anchors(size, aspect_ratios, anchor_scale=4.0, min_level=3, max_level=7):
    effdet = reference.effdet()
    return effdet.anchors.Anchors(min_level, max_level, 3, list(aspect_ratios), anchor_scale,
                                  list(size))


# --- anchors -------------------------------------------------------------------------------

def test_anchors_equal_the_spec_reference_values():
    anchors = detection.generate_anchors(512)
    first_cell = [(-12, -12, 20, 20), (-7.3137, -18.6274, 15.3137, 26.6274),
                  (-18.6274, -7.3137, 26.6274, 15.3137), (-16.1587, -16.1587, 24.1587, 24.1587),
                  (-10.2544, -24.5088, 18.2544, 32.5088), (-24.5088, -10.2544, 32.5088, 18.2544),
                  (-21.3984, -21.3984, 29.3984, 29.3984), (-13.9594, -31.9188, 21.9594, 39.9188),
                  (-31.9188, -13.9594, 39.9188, 21.9594)]
    np.testing.assert_allclose(anchors[:9], first_cell, atol=1e-4)
    np.testing.assert_allclose(anchors[9], (-12, -4, 20, 28))  # next cell to the right
    np.testing.assert_allclose(anchors[64 * 9], (-4, -12, 28, 20))  # next row
    first_p7 = (64 * 64 + 32 * 32 + 16 * 16 + 8 * 8) * 9
    np.testing.assert_allclose(anchors[first_p7], (-192, -192, 320, 320))
    pairs = detection.generate_anchors(512, aspect_ratios=detection.ASPECT_RATIO_PAIRS)
    np.testing.assert_allclose(pairs[1], (-7.2, -18.4, 15.2, 26.4), atol=1e-5)
    # §9 totals: D0..D6 (anchor scale does not change counts), D7, D7x (P3-P8).
    for size, total in [(512, 49104), (640, 76725), (768, 110484), (896, 150381),
                        (1024, 196416), (1280, 306900), (1536, 441936)]:
        assert len(detection.generate_anchors(size)) == total
    assert len(detection.generate_anchors(1536, max_level=8)) == 442260


@pytest.mark.parametrize("size", [(128, 128), (96, 160), (100, 75)])
@pytest.mark.parametrize("ratios", [detection.ASPECT_RATIO_PAIRS, detection.ASPECT_RATIOS],
                         ids=["effdet_pairs", "official_ratios"])
def test_anchors_equal_effdet_anchors_in_both_aspect_ratio_conventions(size, ratios):
    """effdet's Anchors takes both conventions (pairs as given, floats as sqrt(r), 1/sqrt(r)),
    including sizes that do not divide by 128 (float strides) and a D7-style anchor scale."""
    for scale in (4.0, 5.0):
        ours = detection.generate_anchors(size, aspect_ratios=ratios, anchor_scale=scale)
        theirs = _effdet_anchors(size, ratios, scale).boxes.numpy()
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_level_split_inverts_flatten_in_the_anchor_order():
    sizes = detection.feature_sizes(SIZE)
    per_level = [jnp.arange(2 * h * w * 9 * 4, dtype=jnp.float32).reshape(2, h, w, 36)
                 for h, w in sizes]
    flat = detection.flatten_levels(per_level, 4)
    assert flat.shape == (2, len(detection.generate_anchors(SIZE)), 4)
    back = detection.split_levels(flat, SIZE)
    for a, b in zip(per_level, back):
        np.testing.assert_array_equal(a, b)


# --- boxes ---------------------------------------------------------------------------------

def test_box_encoding_equals_the_spec_value_and_decoding_inverts_it():
    encode, decode = jax.jit(detection.encode), jax.jit(detection.decode)
    anchor = jnp.array([-12.0, -12.0, 20.0, 20.0])
    codes = encode(jnp.array([0.0, 2.0, 30.0, 24.0]), anchor)
    np.testing.assert_allclose(codes, (0.34375, 0.28125, -0.06454, -0.37469), atol=1e-5)
    rng = np.random.default_rng(0)
    anchors = detection.generate_anchors(SIZE)
    centres = rng.uniform(0, SIZE, (len(anchors), 2))
    sizes = rng.uniform(2, 200, (len(anchors), 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
    np.testing.assert_allclose(decode(encode(boxes, anchors), anchors), boxes, atol=2e-4)


def test_pairwise_iou_equals_a_direct_computation():
    rng = np.random.default_rng(1)
    a = np.sort(rng.uniform(0, 50, (7, 2, 2)), axis=1).transpose(0, 2, 1).reshape(7, 4)
    a = a[:, [0, 1, 2, 3]]
    b = detection.generate_anchors(32, min_level=3, max_level=4)
    got = jax.jit(detection.pairwise_iou)(a[:, [0, 2, 1, 3]], b)
    boxes = a[:, [0, 2, 1, 3]]
    for i in range(len(boxes)):
        for j in range(len(b)):
            ih = max(0.0, min(boxes[i, 2], b[j, 2]) - max(boxes[i, 0], b[j, 0]))
            iw = max(0.0, min(boxes[i, 3], b[j, 3]) - max(boxes[i, 1], b[j, 1]))
            inter = ih * iw
            union = ((boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
                     + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - inter)
            np.testing.assert_allclose(got[i, j], inter / union if inter else 0.0, atol=1e-6)


# --- losses: spec values -------------------------------------------------------------------

def test_focal_and_huber_losses_equal_the_spec_values():
    focal = jax.jit(detection.focal_loss, static_argnames=("alpha", "gamma", "label_smoothing"))
    cases = [(0.0, 1, 0.0, 0.061266), (0.0, 0, 0.0, 0.183798), (2.0, 1, 0.0, 0.001306),
             (2.0, 1, 0.1, 0.002335), (-4.595, 0, 0.0, 7.6e-6), (-4.595, 0, 0.1, 1.80e-4),
             (-4.595, 1, 0.0, 1.134035)]
    for logit, label, ls, want in cases:
        got = focal(jnp.float32(logit), jnp.float32(label), label_smoothing=ls)
        np.testing.assert_allclose(got, want, rtol=6e-3, atol=1e-7)
    huber = optax.huber_loss(jnp.array([0.05, 0.3]), jnp.zeros(2), delta=0.1)
    np.testing.assert_allclose(huber, [0.00125, 0.025], rtol=1e-6)


def test_focal_loss_equals_optax_without_label_smoothing():
    """The official focal loss differs from optax's only in where label smoothing applies."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(0, 4, (1000,)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, (1000,)), jnp.float32)
    ours = detection.focal_loss(logits, labels)
    theirs = optax.sigmoid_focal_loss(logits, labels, alpha=0.25, gamma=1.5)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)


# --- target assignment against effdet's AnchorLabeler --------------------------------------

def _ground_truth_cases():
    """[B, G] padded ground truth: ties, padding, an empty image, crowd boxes, label 0."""
    rng = np.random.default_rng(3)
    g = 8
    boxes = np.zeros((5, g, 4), np.float32)
    labels = np.full((5, g), -1, np.int32)
    crowd = np.zeros((5, g), bool)
    # 0: two identical boxes (every anchor's argmax ties, both force-match the same anchor), a
    # small box between P3 cells (its best IoU, < 0.5, ties across anchors) and a box equal to
    # anchor 0, a box equal to anchor 306 (zero codes) and garbage in a padded row.
    boxes[0, :5] = [(10, 10, 50, 60), (10, 10, 50, 60), (4, 8, 12, 16), (-12, -12, 20, 20),
                    (4, 4, 36, 36)]
    labels[0, :5] = [3, 7, 2, 4, 6]
    boxes[0, 5] = (30, 30, 90, 90)  # label -1: padding, must not match anything
    # 1: random boxes, some crowd, one labelled 0 (background class, still positive).
    centres = rng.uniform(0, SIZE, (g, 2))
    sizes = rng.uniform(6, 100, (g, 2))
    boxes[1] = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1)
    labels[1] = rng.integers(1, NUM_CLASSES + 1, g)
    labels[1, 2] = 0
    crowd[1, [1, 4]] = True
    # 2: no objects at all. 3: the spec's loss point (§19). 4: one large box and padding.
    boxes[3, :2] = [(-4, -4, 28, 28), (40, 40, 90, 70)]
    labels[3, :2] = [1, 5]
    boxes[4, 0] = (0, 0, 127, 127)
    labels[4, 0] = 10
    return boxes, labels, crowd


def _effdet_labels(boxes, labels, crowd, ratios=detection.ASPECT_RATIO_PAIRS):
    torch = reference.torch()
    effdet = reference.effdet()
    labeler = effdet.anchors.AnchorLabeler(_effdet_anchors((SIZE, SIZE), ratios), NUM_CLASSES)
    keep = [~c for c in crowd]  # officially crowd boxes are dropped before labelling
    cls, box, num = labeler.batch_label_anchors(
        [torch.from_numpy(b[k]) for b, k in zip(boxes, keep)],
        [torch.from_numpy(lab[k]) for lab, k in zip(labels, keep)])
    matches = []
    for b, lab, k in zip(boxes, labels, keep):
        valid = lab[k] > -1
        _, _, m = labeler.target_assigner.assign(
            effdet.object_detection.BoxList(labeler.anchors.boxes),
            effdet.object_detection.BoxList(torch.from_numpy(b[k][valid])),
            torch.from_numpy(lab[k][valid]))
        # effdet indexes the filtered rows; map back to the padded row ids.
        rows = np.flatnonzero(k)[valid]
        res = m.match_results.numpy()
        padded_rows = np.append(rows, -1)  # an empty image has no rows to index
        matches.append(np.where(res >= 0, padded_rows[np.maximum(res, 0)], res))
    return ([c.numpy() for c in cls], [b.numpy() for b in box], num.numpy(), np.stack(matches))


@pytest.mark.parametrize("ratios", [detection.ASPECT_RATIO_PAIRS, detection.ASPECT_RATIOS],
                         ids=["effdet_pairs", "official_ratios"])
def test_target_assignment_equals_effdet_anchor_labeler(ratios):
    boxes, labels, crowd = _ground_truth_cases()
    anchors = detection.generate_anchors(SIZE, aspect_ratios=ratios)
    # The tie cases really tie: both identical rows share each anchor's maximum, and the small
    # box's best IoU (< 0.5) is reached by more than one anchor.
    iou = np.asarray(detection.pairwise_iou(boxes[0], anchors))
    assert np.all(iou[0] == iou[1]) and iou[0].max() >= 0.5
    assert iou[2].max() < 0.5 and np.sum(iou[2] == iou[2].max()) > 1
    assign = jax.jit(detection.assign_targets_batch)
    ours = assign(anchors, boxes, labels, crowd)
    cls, box, num, matches = _effdet_labels(boxes, labels, crowd, ratios)
    np.testing.assert_array_equal(ours.matches, matches)
    np.testing.assert_array_equal(ours.num_positives, num)
    for ours_level, theirs in zip(detection.split_levels(ours.cls_targets, SIZE), cls):
        np.testing.assert_array_equal(ours_level, theirs)
    for ours_level, theirs in zip(detection.split_levels(ours.box_targets, SIZE), box):
        np.testing.assert_allclose(ours_level, theirs, rtol=0, atol=2e-6)
    # The properties the cases were built for, stated directly.
    m = np.asarray(ours.matches)
    assert not np.any(m[0] == 1) and not np.any(m[0] == 5)  # the lower tied row wins; padding
    assert np.all(m[2] == -1) and ours.num_positives[2] == 0  # no objects
    assert not np.any(np.isin(m[1], [1, 4]))  # crowd rows
    assert np.any(m[1] == 2) and np.all(np.asarray(ours.cls_targets)[1][m[1] == 2] == -1)
    best = iou[:5].argmax(1)  # each row's force-matched anchor (the first maximum)
    for anchor in set(best):
        assert m[0, anchor] == np.flatnonzero(best == anchor).min()  # the lower row wins
    assert m[0, 306] == 4 and np.all(np.asarray(ours.box_targets)[0, 306] == 0)


# --- total loss against effdet's loss_fn ---------------------------------------------------

def _effdet_loss(cls_outputs, box_outputs, targets, label_smoothing):
    torch = reference.torch()
    effdet = reference.effdet()
    nchw = [torch.from_numpy(np.array(x)).permute(0, 3, 1, 2) for x in cls_outputs]
    box_nchw = [torch.from_numpy(np.array(x)).permute(0, 3, 1, 2) for x in box_outputs]
    cls_t = [torch.from_numpy(np.array(x)).long()
             for x in detection.split_levels(targets.cls_targets, SIZE)]
    box_t = [torch.from_numpy(np.array(x)) for x in detection.split_levels(targets.box_targets,
                                                                              SIZE)]
    out = effdet.loss.loss_fn(nchw, box_nchw, cls_t, box_t,
                              torch.from_numpy(np.array(targets.num_positives)),
                              num_classes=NUM_CLASSES, alpha=0.25, gamma=1.5, delta=0.1,
                              box_loss_weight=50.0, label_smoothing=label_smoothing)
    return [float(x) for x in out]


def _random_outputs(batch, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    sizes = detection.feature_sizes(SIZE)
    cls = [rng.normal(-2, 2, (batch, h, w, 9 * NUM_CLASSES)).astype(np.float32) for h, w in sizes]
    box = [rng.normal(0, 0.3 * scale, (batch, h, w, 36)).astype(np.float32) for h, w in sizes]
    return cls, box


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_detection_loss_equals_effdet_loss_fn(label_smoothing):
    boxes, labels, crowd = _ground_truth_cases()
    anchors = detection.generate_anchors(SIZE, aspect_ratios=detection.ASPECT_RATIO_PAIRS)
    targets = detection.assign_targets_batch(anchors, boxes, labels, crowd)
    cls, box = _random_outputs(len(boxes), seed=4)
    loss = jax.jit(detection.detection_loss, static_argnames=("num_classes", "label_smoothing"))
    ours = loss(cls, box, targets, num_classes=NUM_CLASSES, label_smoothing=label_smoothing)
    theirs = _effdet_loss(cls, box, targets, label_smoothing)
    np.testing.assert_allclose([ours.total, ours.cls, ours.box], theirs, rtol=2e-5)
    # The normaliser is an argument, so a sharded step can pass the global batch's.
    doubled = loss(cls, box, targets, normalizer=2 * detection.loss_normalizer(
        targets.num_positives), num_classes=NUM_CLASSES, label_smoothing=label_smoothing)
    np.testing.assert_allclose(doubled.total, ours.total / 2, rtol=1e-6)


def test_detection_loss_equals_the_spec_measured_point():
    """§19: 128 px, boxes (-4,-4,28,28) class 1 and (40,40,90,70) class 5, zero logits and box
    outputs, 10 classes: N = 51, class loss 110.48327, box loss 0.0119033, total 111.07844."""
    anchors = detection.generate_anchors(SIZE, aspect_ratios=detection.ASPECT_RATIO_PAIRS)
    boxes = np.array([[(-4, -4, 28, 28), (40, 40, 90, 70), (0, 0, 0, 0)]], np.float32)
    labels = np.array([[1, 5, -1]], np.int32)
    targets = jax.jit(detection.assign_targets_batch)(anchors, boxes, labels)
    assert float(detection.loss_normalizer(targets.num_positives)) == 51
    cls, box = _random_outputs(1, seed=0)
    zeros = [np.zeros_like(x) for x in cls], [np.zeros_like(x) for x in box]
    out = jax.jit(detection.detection_loss, static_argnums=3)(*zeros, targets, NUM_CLASSES)
    # The spec's figures carry 6-8 significant digits.
    np.testing.assert_allclose([out.cls, out.box, out.total], [110.48327, 0.0119033, 111.07844],
                               rtol=5e-6)


# --- IoU losses against a NumPy re-derivation of iou_utils.py -------------------------------

def _numpy_decode(codes, anchors):
    ya, xa = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    h, w = np.exp(codes[:, 2]) * ha, np.exp(codes[:, 3]) * wa
    y, x = codes[:, 0] * ha + ya, codes[:, 1] * wa + xa
    return np.stack([y - h / 2, x - w / 2, y + h / 2, x + w / 2], 1)


def _no_nan(a, b):
    return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def _numpy_iou_loss(codes, code_targets, anchors, normalizer, kind, frozen_pred_for_v=None):
    """tf2/train_lib.py BoxIouLoss + iou_utils.py, per anchor in float64 (the distance term
    per anchor, as in the paper; see detection.losses.iou_variant for the official norm)."""
    mask = (code_targets != 0).astype(np.float64)
    p = _numpy_decode(codes, anchors) * mask
    t = _numpy_decode(code_targets, anchors) * mask
    keep = ((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1]) != 0).astype(np.float64)
    p = p * keep[:, None]
    pw, ph = np.maximum(p[:, 3] - p[:, 1], 0), np.maximum(p[:, 2] - p[:, 0], 0)
    tw, th = np.maximum(t[:, 3] - t[:, 1], 0), np.maximum(t[:, 2] - t[:, 0], 0)
    iw = np.maximum(np.minimum(p[:, 3], t[:, 3]) - np.maximum(p[:, 1], t[:, 1]), 0)
    ih = np.maximum(np.minimum(p[:, 2], t[:, 2]) - np.maximum(p[:, 0], t[:, 0]), 0)
    inter = iw * ih
    union = pw * ph + tw * th - inter
    value = _no_nan(inter, union)
    ey = np.maximum(p[:, 2], t[:, 2]) - np.minimum(p[:, 0], t[:, 0])
    ex = np.maximum(p[:, 3], t[:, 3]) - np.minimum(p[:, 1], t[:, 1])
    if kind == "giou":
        enclose = np.maximum(ey, 0) * np.maximum(ex, 0)
        value = value - _no_nan(enclose - union, enclose)
    elif kind in ("diou", "ciou"):
        rho2 = ((t[:, 0] + t[:, 2]) / 2 - (p[:, 0] + p[:, 2]) / 2) ** 2 + (
            (t[:, 1] + t[:, 3]) / 2 - (p[:, 1] + p[:, 3]) / 2) ** 2
        iou = value
        value = iou - _no_nan(rho2, ey ** 2 + ex ** 2)
        if kind == "ciou":
            if frozen_pred_for_v is not None:  # the official v sends no gradient to predictions
                pw, ph = frozen_pred_for_v
            v = 4 * ((np.arctan(_no_nan(pw, ph)) - np.arctan(_no_nan(tw, th))) / math.pi) ** 2
            value = value - _no_nan(v, (1 - iou) + v) * v
    return np.sum(keep - value) / (4 * normalizer), (pw, ph)


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_iou_losses_equal_a_numpy_rederivation_of_the_official_formulas(kind):
    rng = np.random.default_rng(6)
    anchors = detection.generate_anchors(32, min_level=3, max_level=4).astype(np.float64)
    n = len(anchors)
    targets = rng.normal(0, 0.3, (n, 4))
    targets[rng.random(n) < 0.4] = 0  # negatives
    targets[3, 1] = 0  # a positive with one zero code: its xmin is zeroed, as officially
    codes = targets + rng.normal(0, 0.2, (n, 4))
    normalizer = 7.0
    want, _ = _numpy_iou_loss(codes, targets, anchors, normalizer, kind)
    loss = jax.jit(detection.iou_loss, static_argnames="kind")
    got = loss(jnp.asarray(codes, jnp.float32), jnp.asarray(targets, jnp.float32),
               jnp.asarray(anchors, jnp.float32), normalizer, kind=kind)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # Gradients: central differences of the float64 re-derivation (CIoU's v held at the
    # unperturbed prediction, the official custom gradient) against jax.grad.
    grad = jax.jit(jax.grad(detection.iou_loss), static_argnames="kind")(
        jnp.asarray(codes, jnp.float32), jnp.asarray(targets, jnp.float32),
        jnp.asarray(anchors, jnp.float32), normalizer, kind=kind)
    _, frozen = _numpy_iou_loss(codes, targets, anchors, normalizer, kind)
    eps = 1e-6
    numeric = np.zeros_like(codes)
    for i in np.flatnonzero(np.any(targets != 0, 1))[:12]:
        for k in range(4):
            hi, lo = codes.copy(), codes.copy()
            hi[i, k] += eps
            lo[i, k] -= eps
            numeric[i, k] = (_numpy_iou_loss(hi, targets, anchors, normalizer, kind, frozen)[0]
                             - _numpy_iou_loss(lo, targets, anchors, normalizer, kind, frozen)[0]
                             ) / (2 * eps)
    rows = np.flatnonzero(np.any(targets != 0, 1))[:12]
    np.testing.assert_allclose(np.asarray(grad)[rows], numeric[rows], rtol=2e-3, atol=2e-6)


def test_total_loss_adds_the_weighted_iou_loss():
    boxes, labels, crowd = _ground_truth_cases()
    anchors = detection.generate_anchors(SIZE, aspect_ratios=detection.ASPECT_RATIO_PAIRS)
    targets = jax.jit(detection.assign_targets_batch)(anchors, boxes, labels, crowd)
    cls, box = _random_outputs(len(boxes), seed=7)

    @jax.jit
    def losses(cls, box, targets):
        plain = detection.detection_loss(cls, box, targets, NUM_CLASSES)
        return plain, detection.detection_loss(cls, box, targets, NUM_CLASSES,
                                               iou_loss_type="ciou", iou_loss_weight=2.0,
                                               anchors=anchors)

    plain, with_iou = losses(cls, box, targets)
    n = detection.loss_normalizer(targets.num_positives)
    flat = detection.flatten_levels(box, 4).reshape(-1, 4)
    want = detection.iou_loss(flat, targets.box_targets.reshape(-1, 4), np.tile(anchors,
                              (len(boxes), 1)), n, "ciou")
    np.testing.assert_allclose(with_iou.iou, want, rtol=1e-6)
    np.testing.assert_allclose(with_iou.total, plain.total + 2 * want, rtol=1e-6)


# --- NMS against TensorFlow ----------------------------------------------------------------

def _overlapping_boxes(n, seed, ties=False):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(20, 80, (n, 2))
    sizes = rng.uniform(8, 40, (n, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
    boxes[5] = boxes[4]  # a duplicate box
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if ties:
        scores[10:14] = scores[9]
    return boxes, scores


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_nms_equals_tf_non_max_suppression_v5(soft):
    tf = pytest.importorskip("tensorflow")
    nms = jax.jit(detection.non_max_suppression, static_argnums=(2, 3, 4, 5))
    for seed in range(2):
        boxes, scores = _overlapping_boxes(300, seed, ties=not soft)
        for max_out in (20, 100):
            if soft:  # official: TF gets sigma / 2, IoU threshold 1, score threshold 0.001
                args = dict(iou_threshold=1.0, score_threshold=0.001, soft_nms_sigma=0.25)
                idx, sel, valid = nms(boxes, scores, max_out, 1.0, 0.001, 0.5)
            else:
                args = dict(iou_threshold=0.5, score_threshold=float("-inf"), soft_nms_sigma=0.0)
                idx, sel, valid = nms(boxes, scores, max_out, 0.5, float("-inf"), 0.0)
            t_idx, t_scores, t_n = tf.raw_ops.NonMaxSuppressionV5(
                boxes=boxes, scores=scores, max_output_size=max_out,
                pad_to_max_output_size=False, **args)
            n = int(t_n)
            assert int(np.sum(valid)) == n
            np.testing.assert_array_equal(np.asarray(idx)[:n], t_idx.numpy())
            np.testing.assert_allclose(np.asarray(sel)[:n], t_scores.numpy(), rtol=2e-6)
            assert np.all(np.asarray(idx)[n:] == -1)
    eager = detection.non_max_suppression(boxes, scores, 20, 0.5, 0.001, 0.5 if soft else 0.0)
    np.testing.assert_array_equal(eager[0], nms(boxes, scores, 20, 0.5, 0.001,
                                                0.5 if soft else 0.0)[0])


def test_per_class_postprocessing_equals_the_official_tf_pipeline():
    """tf2/postprocess.py per_class_nms, written with TF ops: top-k (anchor, class) logits,
    decode, NMS per class, concatenate, pad, top 100, times the image scale."""
    tf = pytest.importorskip("tensorflow")
    anchors = detection.generate_anchors(SIZE)
    cls, box = _random_outputs(2, seed=8, scale=0.5)
    scales = np.array([1.5, 0.75], np.float32)
    for method in ("gaussian", "hard"):
        post = jax.jit(detection.generate_detections,
                       static_argnames=("num_classes", "method", "max_nms_inputs"))
        ours = post(cls, box, anchors, NUM_CLASSES, scales, method=method, max_nms_inputs=500)
        logits = np.asarray(detection.flatten_levels(cls, NUM_CLASSES))
        codes = np.asarray(detection.flatten_levels(box, 4))
        for b in range(2):
            top, flat = tf.math.top_k(logits[b].reshape(-1), k=500)
            anchor_idx, classes = (flat // NUM_CLASSES).numpy(), (flat % NUM_CLASSES).numpy()
            boxes = _numpy_decode(codes[b][anchor_idx].astype(np.float64),
                                  anchors[anchor_idx].astype(np.float64)).astype(np.float32)
            scores = tf.math.sigmoid(top).numpy()
            all_boxes, all_scores, all_classes = [], [], []
            for c in range(NUM_CLASSES):
                at = np.flatnonzero(classes == c)
                if not len(at):
                    continue
                args = (dict(iou_threshold=1.0, score_threshold=0.001, soft_nms_sigma=0.25)
                        if method == "gaussian" else
                        dict(iou_threshold=0.5, score_threshold=float("-inf"),
                             soft_nms_sigma=0.0))
                idx, sel, _ = tf.raw_ops.NonMaxSuppressionV5(
                    boxes=boxes[at], scores=scores[at], max_output_size=100,
                    pad_to_max_output_size=False, **args)
                all_boxes.append(boxes[at][idx.numpy()])
                all_scores.append(sel.numpy())
                all_classes.append(np.full(len(idx), c + 1))
            cat_boxes = np.concatenate(all_boxes + [np.zeros((100, 4), np.float32)])
            cat_scores = np.concatenate(all_scores + [np.zeros(100, np.float32)])
            cat_classes = np.concatenate(all_classes + [np.zeros(100)])
            _, keep = tf.math.top_k(cat_scores, k=100)
            keep = keep.numpy()
            n = min(100, sum(len(s) for s in all_scores))
            assert int(ours.num_detections[b]) == n
            np.testing.assert_allclose(ours.scores[b], cat_scores[keep], rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(ours.classes[b], cat_classes[keep])
            np.testing.assert_allclose(ours.boxes[b], cat_boxes[keep] * scales[b], atol=2e-4)


def test_global_postprocessing_equals_one_tf_nms_over_best_classes():
    """The inference ("global") path: each anchor's best class, one class-agnostic NMS (TF's
    op), boxes clipped to the input, then scaled."""
    tf = pytest.importorskip("tensorflow")
    anchors = detection.generate_anchors(SIZE)
    cls, box = _random_outputs(1, seed=9, scale=2.0)
    post = jax.jit(detection.generate_detections, static_argnames=(
        "num_classes", "method", "max_nms_inputs", "per_class", "image_size"))
    out = post(cls, box, anchors, NUM_CLASSES, np.float32([2.0]), method="hard",
               max_nms_inputs=0, per_class=False, image_size=(SIZE, SIZE))
    logits = np.asarray(detection.flatten_levels(cls, NUM_CLASSES))[0]
    codes = np.asarray(detection.flatten_levels(box, 4))[0]
    boxes = _numpy_decode(codes.astype(np.float64), anchors.astype(np.float64)).astype(np.float32)
    idx, _, n = tf.raw_ops.NonMaxSuppressionV5(
        boxes=boxes, scores=tf.math.sigmoid(logits.max(-1)), max_output_size=100,
        iou_threshold=0.5, score_threshold=float("-inf"), soft_nms_sigma=0.0,
        pad_to_max_output_size=False)
    n, idx = int(n), idx.numpy()
    assert int(out.num_detections[0]) == n and not np.any(out.valid[0, n:])
    np.testing.assert_array_equal(out.classes[0, :n], logits.argmax(-1)[idx] + 1)
    np.testing.assert_allclose(out.boxes[0, :n], np.clip(boxes[idx], 0, SIZE) * 2.0, atol=5e-4)


def test_postprocessing_exports_with_fixed_output_shapes():
    anchors = detection.generate_anchors(SIZE)
    cls, box = _random_outputs(2, seed=10)

    def post(cls, box, scales):
        return detection.generate_detections(cls, box, anchors, NUM_CLASSES, scales,
                                             max_nms_inputs=1000)

    exported = jax.export.export(jax.jit(post))(cls, box, np.ones(2, np.float32))
    out = exported.call(cls, box, np.ones(2, np.float32))
    assert out.boxes.shape == (2, 100, 4) and out.classes.shape == (2, 100)
    np.testing.assert_array_equal(out.num_detections, np.sum(out.valid, -1))
    assert np.all(np.diff(np.asarray(out.scores), axis=-1) <= 0)  # best first, zeros last
