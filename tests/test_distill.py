"""Knowledge distillation (training/distill.py): the loss against a NumPy reference, what the
temperature does to the softmax and to the gradient, and a train step whose gradient never
reaches the eval-mode teacher. The end-to-end train.py run is in tests/test_train.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from experiments import common
from tests.helpers import jitted_apply, random_train_state, random_variables
from training import distill, distributed, loop, optimizers, steps

SIZE = 32


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_loss(student, teacher, targets, alpha, temperature, smoothing=0.0):
    targets = (1 - smoothing) * targets + smoothing / targets.shape[-1]
    ce = -(targets * np_log_softmax(student)).sum(-1).mean()
    p, log_p = np_softmax(teacher / temperature), np_log_softmax(teacher / temperature)
    kl = (p * (log_p - np_log_softmax(student / temperature))).sum(-1).mean()
    return alpha * ce + (1 - alpha) * temperature ** 2 * kl


def logits(seed, batch=4, classes=7, scale=3.0):
    return (np.random.default_rng(seed).normal(size=(batch, classes)) * scale).astype(np.float32)


# One-hot rows and a MixUp row (0.7 / 0.3).
TARGETS = np.eye(7, dtype=np.float32)[[0, 3, 6, 2]]
TARGETS[3] = 0.7 * np.eye(7)[2] + 0.3 * np.eye(7)[5]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_loss_is_the_numpy_reference(alpha, temperature):
    s, t = logits(0), logits(1)
    for smoothing in (0.0, 0.1):
        ours = distill.loss(s, t, TARGETS, alpha, temperature, label_smoothing=smoothing)
        assert ours.dtype == jnp.float32
        np.testing.assert_allclose(
            float(ours), np_loss(s, t, TARGETS, alpha, temperature, smoothing), rtol=1e-5)


def test_loss_is_float32_for_bfloat16_logits():
    s, t = logits(0), logits(1)
    ours = distill.loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), TARGETS,
                        0.5, 4.0)
    assert ours.dtype == jnp.float32
    reference = np_loss(np.asarray(jnp.asarray(s, jnp.bfloat16), np.float32),
                        np.asarray(jnp.asarray(t, jnp.bfloat16), np.float32), TARGETS, 0.5, 4.0)
    np.testing.assert_allclose(float(ours), reference, rtol=1e-5)


def test_the_kl_term_is_zero_when_student_equals_teacher():
    z = logits(2)
    _, kl = distill.terms(z, z, TARGETS, 4.0)
    assert float(kl) == 0.0


def test_temperature_scales_the_softmax_as_defined():
    z = logits(3, scale=1.0)    # no row saturates to a one-hot in float32 at T = 0.5
    previous_max, previous_entropy = np.inf, -np.inf
    for temperature in (0.5, 1.0, 2.0, 4.0, 16.0, 1e3):
        p = np.asarray(distill.soften(z, temperature))
        np.testing.assert_allclose(p, np_softmax(z / temperature), rtol=1e-5, atol=1e-7)
        # Higher T, flatter: the top probability falls and the entropy rises, toward uniform.
        top, entropy = p.max(-1), -(p * np.log(p)).sum(-1)
        assert np.all(top < previous_max) and np.all(entropy > previous_entropy)
        previous_max, previous_entropy = top, entropy
    np.testing.assert_allclose(p, 1 / 7, rtol=5e-3)
    np.testing.assert_array_equal(distill.soften(z, 1.0), jax.nn.softmax(z))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_gradient_is_what_the_definition_gives(temperature):
    """d loss / d student = alpha (softmax(s) - y) / B + (1 - alpha) T (softmax(s/T) -
    softmax(t/T)) / B: the T^2 factor turns the soft term's 1/T into T."""
    s, t = logits(4), logits(5)
    alpha, batch = 0.3, s.shape[0]
    grad = jax.grad(distill.loss)(s, t, TARGETS, alpha, temperature)
    expected = (alpha * (np_softmax(s) - TARGETS) / batch
                + (1 - alpha) * temperature * (np_softmax(s / temperature)
                                               - np_softmax(t / temperature)) / batch)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_soft_gradient_is_temperature_independent_to_first_order():
    """For large T the soft term's gradient tends to ((s - mean s) - (t - mean t)) / (C B), the
    same for every T (Hinton et al.'s matching-logits limit); the rest shrinks like 1 / T."""
    s, t = logits(6, scale=1.0), logits(7, scale=1.0)
    batch, classes = s.shape
    limit = ((s - s.mean(-1, keepdims=True)) - (t - t.mean(-1, keepdims=True))) / (
        classes * batch)
    errors = []
    for temperature in (10.0, 100.0, 1000.0):
        grad = np.asarray(jax.grad(distill.loss)(s, t, TARGETS, 0.0, temperature))
        errors.append(np.abs(grad - limit).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[0] < 0.2 and errors[2] / errors[1] < 0.2   # about 1 / T
    assert errors[2] < 2e-3 * np.abs(limit).max()


def test_bad_weights_are_errors():
    with pytest.raises(ValueError, match=r"alpha=1.5: .* in \[0, 1\]"):
        distill.check_weights(1.5, 4.0)
    with pytest.raises(ValueError, match="temperature=0.0: must be > 0"):
        distill.check_weights(0.5, 0.0)


# ----------------------------------------------------------------------------------------------
# The train step: resnet18 student, resnet18 teacher (random variables, BN statistics away from
# the identity, so an eval-mode teacher and a training-mode one give different logits).


@pytest.fixture(scope="module")
def setup():
    config = common.base()
    config.model, config.data.num_classes, config.data.train_size = "resnet18", 10, SIZE
    mesh = distributed.data_mesh()
    model = nets.transformed("resnet18", num_classes=10)
    teacher_variables = random_variables(model, jnp.zeros((1, SIZE, SIZE, 3)), seed=3)
    teacher = distill.Teacher(model, alpha=0.3, temperature=3.0, description="random resnet18")
    schedule = optimizers.learning_rate(config.optimizer, 2, 10.0, 10)
    optimizer = optimizers.optimizer(config.optimizer, "resnet18", teacher_variables[0],
                                     schedule)
    state = random_train_state(model, optimizer, SIZE, ema=False, seed=1)
    rng = np.random.default_rng(0)
    batch = {"images": rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32),
             "targets": np.eye(10, dtype=np.float32)[[1, 7]]}
    return dict(mesh=mesh, model=model, teacher=teacher, teacher_variables=teacher_variables,
                state=state, optimizer=optimizer, schedule=schedule, batch=batch)


def test_no_gradient_reaches_the_teacher(setup):
    loss_fn = distill.objective(setup["model"], setup["teacher"], dtype=jnp.float32,
                                label_smoothing=0.0)
    state = setup["state"]

    def teacher_loss(teacher_variables):
        return loss_fn(state.params, state.model_state, None, setup["batch"],
                       teacher_variables)[0]

    loss, grads = jax.jit(jax.value_and_grad(teacher_loss))(setup["teacher_variables"])
    assert np.isfinite(float(loss)) and float(loss) > 0
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(setup["teacher_variables"]))
    for g in leaves:
        np.testing.assert_array_equal(g, np.zeros_like(g))


def test_train_step_distils_from_the_eval_mode_teacher(setup):
    mesh = setup["mesh"]
    loss = distill.objective(setup["model"], setup["teacher"], dtype=jnp.float32,
                             label_smoothing=0.0)
    step = steps.train_step(loss, setup["optimizer"], setup["schedule"], ema_decay=0.0,
                            mesh=mesh, extra=True)
    teacher_variables = jax.device_put(setup["teacher_variables"], distributed.replicated(mesh))
    copies = jax.device_get(teacher_variables)
    state = jax.tree.map(lambda x: x.copy(), setup["state"])    # the step donates its state
    structure = jax.tree.structure(state)
    first = jax.device_get((state.params, state.model_state))
    batch = distributed.global_batch(setup["batch"], distributed.batch_sharded(mesh))
    history = []
    for _ in range(2):
        state, metrics = step(state, batch, teacher_variables)
        history.append(jax.device_get(metrics))

    # The logged terms are the student's (training mode) and the teacher's (eval mode) logits
    # through distill.terms, and the loss combines them.
    apply = jitted_apply("resnet18", 10)
    images = setup["batch"]["images"]
    student_logits, _ = apply(*first, None, images, is_training=True)
    teacher_logits, _ = apply(*copies, None, images, is_training=False)
    ce, kl = distill.terms(student_logits, teacher_logits, setup["batch"]["targets"], 3.0)
    np.testing.assert_allclose([history[0]["ce"], history[0]["kl"]], [ce, kl], rtol=1e-5)
    np.testing.assert_allclose(history[0]["loss"], 0.3 * ce + 0.7 * 9.0 * kl, rtol=1e-5)
    train_mode_teacher, _ = apply(*copies, None, images, is_training=True)
    assert not np.allclose(distill.terms(student_logits, train_mode_teacher,
                                         setup["batch"]["targets"], 3.0)[1], kl, rtol=1e-3)

    # The teacher is an argument, never donated nor updated, and not in the train state or the
    # optimizer state, which keep the structure of a run without a teacher.
    assert not any(x.is_deleted() for x in jax.tree.leaves(teacher_variables))
    for a, b in zip(jax.tree.leaves(jax.device_get(teacher_variables)), jax.tree.leaves(copies),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(state) == structure
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(
        jax.eval_shape(setup["optimizer"].init, first[0]))
    assert history[1]["loss"] != history[0]["loss"]    # the student moved


def test_train_run_checks_the_teacher_before_reading_data(tmp_path):
    path = tmp_path / "teacher.safetensors"
    f = nets.transformed("resnet18", num_classes=12)
    nets.weights.save(path, *random_variables(f, jnp.zeros((1, SIZE, SIZE, 3))),
                      model="resnet18")
    config = common.base()
    config.model, config.data.num_classes, config.data.train_size = "resnet18", 10, SIZE
    config.data.data_dir = str(tmp_path)    # no dataset there: the config errors come first
    config.distill.teacher_from = str(path)
    with pytest.raises(loop.ConfigError, match="config.distill is read by the distillation "
                                               "task: add --config.task=distillation"):
        loop.run(config, str(tmp_path / "run"))
    config.task = "distillation"
    with pytest.raises(loop.ConfigError, match="predicts 12 classes, the data has 10"):
        loop.run(config, str(tmp_path / "run"))
    config.distill.teacher = "resnet34"
    with pytest.raises(loop.ConfigError, match="distill.teacher='resnet34', but .* holds resnet18"):
        loop.run(config, str(tmp_path / "run"))
    config.distill.teacher_from = ""
    with pytest.raises(loop.ConfigError, match="needs its weights: pass "
                                               "--config.distill.teacher_from=PATH"):
        loop.run(config, str(tmp_path / "run"))
