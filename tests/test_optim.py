"""The NFNet optimizer against an independent NumPy implementation of nfnet_spec.md §10-12."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nets
import optim


def _numpy_unitwise_norm(x):
    if np.squeeze(x).ndim <= 1:
        return np.sqrt(np.sum(x ** 2))
    axes = 0 if x.ndim in (2, 3) else (0, 1, 2)
    return np.sqrt(np.sum(x ** 2, axis=axes, keepdims=True))


def _numpy_agc(g, w, clipping=0.01, eps=1e-3):
    max_norm = clipping * np.maximum(_numpy_unitwise_norm(w), eps)
    g_norm = _numpy_unitwise_norm(g)
    clipped = g * (max_norm / np.maximum(g_norm, 1e-6))
    return np.where(g_norm > max_norm, clipped, g)


def _numpy_sgd_agc(params, grads_per_step, roles, stacked, lr, clip_classifier_bias=True):
    """§10.2 step by step: AGC on the raw gradient (per block for stacked leaves), coupled weight
    decay on weights, momentum 0.9, Nesterov, W -= lr(t) * G."""
    params = {k: v.copy() for k, v in params.items()}
    momentum = {k: np.zeros_like(v) for k, v in params.items()}
    for t, grads in enumerate(grads_per_step):
        for k in params:
            g, w, role = grads[k].copy(), params[k], roles[k]
            if role != "classifier_weight" and (clip_classifier_bias or role != "classifier_bias"):
                g = (np.stack([_numpy_agc(gi, wi) for gi, wi in zip(g, w)]) if stacked[k]
                     else _numpy_agc(g, w))
            if role in ("weight", "classifier_weight"):
                g = g + 2e-5 * w
            momentum[k] = 0.9 * momentum[k] + g
            g = g + 0.9 * momentum[k]
            params[k] = w - lr(t) * g
    return params


ROLES = {"conv": "weight", "stacked_conv": "weight", "gain": "gain", "stacked_bias": "bias",
         "skip_gain": "skip_gain", "se": "weight", "fc_w": "classifier_weight",
         "fc_b": "classifier_bias"}
STACKED = {k: int(k.startswith("stacked")) for k in ROLES}
# The NFNet recipe in the registry's role vocabulary: decay weights only; the head's two roles.
NFNET_ROLES = dict(decay_roles=(nets.registry.WEIGHT, nets.registry.CLASSIFIER_WEIGHT),
                   classifier_roles=nets.registry.CLASSIFIER_ROLES)


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "conv": rng.normal(size=(3, 3, 4, 8)) * 0.1,
        "stacked_conv": rng.normal(size=(2, 3, 3, 4, 8)) * 0.1,
        "gain": np.ones(8),
        "stacked_bias": np.zeros((2, 8)),  # zero-initialised: clipped to 0.01 * eps
        "skip_gain": np.zeros(()),
        "se": rng.normal(size=(8, 4)) * 0.3,
        "fc_w": rng.normal(size=(8, 5)) * 0.01,
        "fc_b": np.zeros(5),
    }
    params = {k: v.astype(np.float32) for k, v in params.items()}
    grads = [{k: (rng.normal(size=v.shape) * rng.choice([1e-4, 1.0, 10.0])).astype(np.float32)
              for k, v in params.items()} for _ in range(5)]
    return params, grads


@pytest.mark.parametrize("clip_classifier_bias", [True, False])
def test_sgd_agc_equals_the_numpy_reference_over_several_steps(clip_classifier_bias):
    params, grads = _problem()
    lr = optim.warmup_cosine(1.6, warmup_steps=2.5, total_steps=5)
    tx = optim.nfnet_optimizer(ROLES, lr, stacked=STACKED,
                               clip_classifier_bias=clip_classifier_bias, **NFNET_ROLES)
    ours = jax.tree.map(jnp.asarray, params)
    state = tx.init(ours)
    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for g in grads:
        ours, state = step(ours, state, g)
    expected = _numpy_sgd_agc(params, grads, ROLES, STACKED, lambda t: float(lr(t)),
                              clip_classifier_bias)
    for k in params:
        np.testing.assert_allclose(ours[k], expected[k], rtol=2e-5, atol=1e-7, err_msg=k)


def test_zero_initialised_parameters_are_clipped_to_the_eps_floor():
    params = {"skip_gain": jnp.zeros(()), "w": jnp.ones((2, 3))}
    grads = {"skip_gain": jnp.asarray(5.0), "w": jnp.full((2, 3), 100.0)}
    clipped, _ = optim.adaptive_grad_clip(0.01).update(grads, None, params)
    np.testing.assert_allclose(clipped["skip_gain"], 0.01 * 1e-3, rtol=1e-6)
    # per output unit (column): norm of the clipped gradient = 0.01 * ||w column|| = 0.01 * sqrt 2
    np.testing.assert_allclose(np.linalg.norm(clipped["w"], axis=0), 0.01 * np.sqrt(2), rtol=1e-5)


def test_the_classifier_weight_is_not_clipped_and_gains_are_not_decayed():
    params, grads = _problem(1)
    tx = optim.nfnet_optimizer(ROLES, 1.0, stacked=STACKED, momentum=0.0, **NFNET_ROLES)
    ours, grad = jax.tree.map(jnp.asarray, (params, grads[0]))
    updates, _ = tx.update(grad, tx.init(ours), ours)
    np.testing.assert_allclose(updates["fc_w"], -(grads[0]["fc_w"] + 2e-5 * params["fc_w"]),
                               rtol=1e-6)
    zero_grad = jax.tree.map(jnp.zeros_like, ours)
    updates, _ = tx.update(zero_grad, tx.init(ours), ours)
    assert float(jnp.abs(updates["gain"]).max()) == 0.0
    np.testing.assert_allclose(updates["conv"], -2e-5 * params["conv"], rtol=1e-6)


def test_schedule_is_linear_from_zero_then_cosine_to_zero():
    batch, epochs, images = 4096, 360, 1_281_167
    peak = optim.scaled_learning_rate(0.1, batch)
    total, warmup = images * epochs // batch, 5 * images / batch
    lr = optim.warmup_cosine(peak, warmup, total)
    assert peak == pytest.approx(1.6) and total == 112_602
    assert float(lr(0)) == 0.0
    assert float(lr(warmup / 2)) == pytest.approx(0.8, rel=1e-5)
    assert float(lr(1563)) == pytest.approx(1.6 * 1563 / 1563.92, rel=1e-5)
    assert float(lr(1564)) == pytest.approx(
        0.8 * (1 + np.cos(np.pi * (1564 - warmup) / (total - warmup))), rel=1e-5)
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-7)


def test_ema_uses_the_tf1_warm_up():
    assert float(optim.ema_decay(0, 0.99999)) == pytest.approx(0.1)
    assert float(optim.ema_decay(90, 0.99999)) == pytest.approx(0.91)
    assert float(optim.ema_decay(10**7, 0.99999)) == pytest.approx(0.99999)
    ema = optim.ema_update({"w": jnp.ones(2)}, {"w": jnp.zeros(2)}, step=0)
    np.testing.assert_allclose(ema["w"], [0.1, 0.1], rtol=1e-6)


def test_nfnet_masks_come_from_the_models_roles():
    params, _ = nets.introspect.shapes("nfnet_f0", 10)
    roles = nets.param_roles("nfnet_f0", params)
    stacked = nets.stacked_axes("nfnet_f0", params)
    assert stacked["nfnet/stage3_blocks/block/conv1"]["w"] == 1
    assert stacked["nfnet/stage3_block0/conv1"]["w"] == 0
    assert all(params[m][leaf].shape[0] == 5 for m in stacked for leaf in stacked[m]
               if stacked[m][leaf] and m.startswith("nfnet/stage3"))
    tx = optim.nfnet_optimizer(roles, 0.1, stacked=stacked, **NFNET_ROLES)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    updates, _ = jax.eval_shape(tx.update, zeros, jax.eval_shape(tx.init, zeros), zeros)
    assert jax.tree.map(lambda s: s.shape, updates) == jax.tree.map(lambda s: s.shape, params)


def test_tf1_rmsprop_equals_the_tf1_update_with_a_schedule():
    rng = np.random.RandomState(0)
    w0 = rng.randn(5).astype(np.float32)
    grads = [rng.randn(5).astype(np.float32) for _ in range(4)]
    lr = optim.warmup_exponential_decay(0.1, 2, 1, 0.5)
    opt = optim.tf1_rmsprop(lr)
    w, state = jnp.asarray(w0), opt.init(jnp.asarray(w0))
    for g in grads:
        updates, state = opt.update(jnp.asarray(g), state, w)
        w = optax.apply_updates(w, updates)
    # TF1 RMSPropOptimizer by hand: ms starts at one, eps inside the root, lr inside momentum.
    ms, mom, ref = np.ones(5), np.zeros(5), w0.astype(np.float64)
    for t, g in enumerate(grads):
        ms = 0.9 * ms + 0.1 * g ** 2
        mom = 0.9 * mom + float(lr(t)) * g / np.sqrt(ms + 1e-3)
        ref = ref - mom
    np.testing.assert_allclose(w, ref, rtol=1e-5)


def test_exponential_schedule_warms_up_then_decays_in_stairs_from_step_zero():
    lr = optim.warmup_exponential_decay(0.256, 50, 24, 0.97)
    assert float(lr(0)) == 0.0 and float(lr(25)) == pytest.approx(0.128)
    assert float(lr(50)) == pytest.approx(0.256 * 0.97 ** 2)  # the stairs count from step 0
    assert float(lr(71)) == pytest.approx(0.256 * 0.97 ** 2)
    assert float(lr(72)) == pytest.approx(0.256 * 0.97 ** 3)
    smooth = optim.warmup_exponential_decay(1.0, 0, 10, 0.5, staircase=False)
    assert float(smooth(5)) == pytest.approx(0.5 ** 0.5)


# ----------------------------------------------------------------------------------------------
# The official EfficientDet trainer's schedule and gradient clipping (efficientdet_spec.md §13).


def _official_cosine_lr(step, peak, warmup, total, warmup_init):
    """automl's CosineLrSchedule written out: the linear warm-up from warmup_init, then
    0.5 * peak * (1 + cos(pi * t / (T - W))) on the global step t (not t - W)."""
    t = np.asarray(step, np.float64)
    linear = warmup_init + t / warmup * (peak - warmup_init)
    cosine = 0.5 * peak * (1.0 + np.cos(np.pi * t / (total - warmup)))
    return np.where(t < warmup, linear, cosine)


def test_warmup_cosine_global_step_is_the_official_formula():
    peak, warmup, total, init = 0.16, 62.5, 1000, 0.016
    lr = optim.warmup_cosine_global_step(peak, warmup, total, init)
    steps = np.arange(total + 1)
    ours = np.asarray(jax.vmap(lr)(steps))
    np.testing.assert_allclose(ours, _official_cosine_lr(steps, peak, warmup, total, init),
                               rtol=2e-5, atol=1e-8)
    assert float(lr(0)) == pytest.approx(init)
    # The cosine on the global step starts below the peak right after the warm-up, reaches 0
    # at T - W and climbs back over the last W steps; cosine(t - W) would be at the peak at W.
    assert float(lr(63)) == pytest.approx(0.5 * peak * (1 + np.cos(np.pi * 63 / 937.5)),
                                       rel=1e-5)
    assert float(lr(63)) < 0.995 * peak
    assert float(lr(937.5)) == pytest.approx(0.0, abs=1e-7)
    assert float(lr(total)) == pytest.approx(0.5 * peak * (1 + np.cos(np.pi * 1000 / 937.5)),
                                          rel=1e-5)
    assert float(lr(total)) > float(lr(950))
    # Without a warm-up it is the plain cosine over T.
    plain = optim.warmup_cosine_global_step(peak, 0, total)
    np.testing.assert_allclose(np.asarray(jax.vmap(plain)(steps)),
                               0.5 * peak * (1 + np.cos(np.pi * steps / total)), rtol=2e-5,
                               atol=1e-8)


@pytest.mark.parametrize("scales", [(0.1, 3.0, 20.0, 0.5, 0.0), (0.01, 0.2, 0.05, 0.1, 0.0)],
                         ids=["global_clip_acts", "nothing_clipped"])
def test_clip_each_then_global_equals_tensorflow(scales):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    shapes = [(3, 3, 4, 8), (8,), (16, 5), (2, 3, 3, 4), (7,)]
    grads = [(rng.normal(size=s) * k).astype(np.float32) for s, k in zip(shapes, scales)]
    norms = [np.linalg.norm(g) for g in grads]
    if scales[2] == 20.0:   # some tensors above the norm, some below
        assert max(norms) > 10 and min(n for n in norms if n > 0) < 10
    expected = [tf.clip_by_norm(tf.constant(g), 10.0) for g in grads]
    expected, _ = tf.clip_by_global_norm(expected, 10.0)
    tree = {f"g{i}": jnp.asarray(g) for i, g in enumerate(grads)}
    tx = optim.clip_each_then_global(10.0)
    clipped, _ = tx.update(tree, tx.init(tree))
    for i, e in enumerate(expected):
        np.testing.assert_allclose(clipped[f"g{i}"], e.numpy(), rtol=1e-6, atol=1e-7)
    total = np.sqrt(sum(np.sum(np.asarray(v) ** 2) for v in clipped.values()))
    assert total <= 10.0 * (1 + 1e-6)


def test_grad_clip_norm_clips_the_decayed_gradient():
    """Weight decay is part of the gradient that is clipped (the L2 term of the official loss):
    a zero gradient with a large decayed weight is clipped, not passed through."""
    from experiments import common
    from training import optimizers

    cfg = common.base().optimizer
    cfg.update(dict(name="sgd", momentum=0.0, nesterov=False, weight_decay=0.1,
                    decay_roles=("weight",), grad_clip_norm=1.0))
    params = {"conv": {"w": jnp.full((3,), 100.0)}, "bn": {"scale": jnp.ones((2,))}}
    grads = {"conv": {"w": jnp.zeros((3,))}, "bn": {"scale": jnp.full((2,), 0.5)}}
    tx = optimizers.optimizer(cfg, "resnet18", params, lambda step: 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    # By hand: decay (weights only), each tensor to norm 1, then all to global norm 1.
    g = {"w": 0.1 * np.full(3, 100.0), "scale": np.full(2, 0.5)}
    g = {k: v * min(1.0, 1.0 / np.linalg.norm(v)) for k, v in g.items()}
    total = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
    g = {k: v * min(1.0, 1.0 / total) for k, v in g.items()}
    np.testing.assert_allclose(updates["conv"]["w"], -g["w"], rtol=1e-6)
    np.testing.assert_allclose(updates["bn"]["scale"], -g["scale"], rtol=1e-6)
    # Clipping before the decay would have left the decay term -0.1 * 100 = -10 whole.
    assert np.all(np.abs(np.asarray(updates["conv"]["w"])) < 1.0)
