"""Every registered model, by one parametrised suite (as timm's tests/test_models.py): the feature
maps at the registered strides, a role for every parameter, the fusion plan; for classifiers the
logits with num_classes 42 and 0 and the registry's counts against the reference figures; and
one real forward and backward pass per family. A new variant or family is covered with no edit
here.

The shape checks trace each model abstractly (`jax.eval_shape`, nothing computed) at a small
input, once per (model, num_classes) and once more for its features and its fusion plan. The
42-class trace takes the run's conv lowering (the CPU lowerings here); the others trace XLA's
native convs, in half the time (shapes do not depend on the lowering, tests/test_layers.py).
Variants of one network (`network`: MobileNet's resolution multipliers) share its traces."""

import contextlib
import functools
import json

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from tests.helpers import REFERENCE_DIR, count, random_values, reference_figures

MODELS = nets.list_models()
CLASSIFIERS = [n for n in MODELS if nets.model_info(n).task == "classification"]
FAMILIES = sorted({nets.model_info(n).family for n in MODELS})
BATCH = 2


def input_size(name):
    """64 px, or the largest feature stride where that is larger: a multiple of every stride;
    at least the variant's `min_input_size` (unpadded convs: Inception-v3's 75 px)."""
    info = nets.model_info(name)
    return max(64, info.min_input_size, *info.feature_strides)


def _shapes(tree):
    return jax.tree.map(lambda leaf: leaf.shape, tree)


@contextlib.contextmanager
def native_lowering():
    """XLA's native convs while tracing (nets.layers.default_lowering reads the variable)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NETS_CONV_LOWERING", "native")
        yield


_FIRST_WITH_NETWORK = {}
for _name in MODELS:
    _FIRST_WITH_NETWORK.setdefault(nets.registry.network_key(_name), _name)


def network(name: str) -> str:
    """The first registered variant with the same network as `name` (`nets.registry.
    network_key`): variants that differ only in their train / test size or preprocessing
    (MobileNet's resolution multipliers) share its traces."""
    return _FIRST_WITH_NETWORK[nets.registry.network_key(name)]


def traced(name: str, num_classes: int):
    return _traced(network(name), num_classes)


@functools.cache
def _traced(name: str, num_classes: int):
    """(params, state, output shapes) of the variant's forward, `nets.create(name, num_classes)`
    as `nets.transformed` wraps it, from one abstract trace of its init on BATCH images of
    `input_size`. Parameters are created as zeros: only their shapes matter, and tracing the
    initialisers would take a third of the time."""
    output = {}

    def forward(images):
        with nets.registry.zero_init():
            out = nets.create(name, num_classes)(images, is_training=True)
        output["shapes"] = _shapes(out)
        return out

    images = nets.introspect.example_images(name, BATCH, input_size(name))
    init = functools.partial(jax.eval_shape, hk.transform_with_state(forward).init,
                             jax.random.key(0), images)
    with contextlib.nullcontext() if num_classes == 42 else native_lowering():
        params, state = init()
    return params, state, output["shapes"]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_logits_have_the_requested_number_of_classes(name):
    assert traced(name, 42)[2] == (BATCH, 42)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_num_classes_zero_drops_the_head_and_returns_pooled_features(name):
    with_head, _, _ = traced(name, 42)
    no_head, _, pooled = traced(name, 0)
    head = nets.head_module(name)
    assert head in with_head and head not in no_head
    assert _shapes(no_head) == _shapes({m: v for m, v in with_head.items() if m != head})
    assert pooled == (BATCH, with_head[head]["w"].shape[0])  # the head's input


@pytest.mark.parametrize("name", MODELS)
def test_features_are_the_stages_at_the_registered_strides(name):
    """`nets.transformed_features` maps, named stage1, stage2, ... at strides
    `model_info.feature_strides` (video models' 3D stages keep a time axis before H, W), of
    size input // stride or the sizes the variant declares (`model_info.stage_sizes`)."""
    maps = _feature_maps(network(name))
    size = input_size(name)
    info = nets.model_info(name)
    strides, sizes = info.feature_strides, info.stage_sizes(size)
    assert len(sizes) == len(strides)
    assert list(maps) == [f"stage{i + 1}" for i in range(len(strides))]
    assert [(m.shape[0], *m.shape[-3:-1]) for m in maps.values()] == [
        (BATCH, n, n) for n in sizes]


@functools.cache
def _feature_maps(name: str):
    params, state, _ = traced(name, 42)  # features use a subset of the model's parameters
    images = nets.introspect.example_images(name, BATCH, input_size(name))
    f = nets.transformed_features(name)
    with native_lowering():
        maps, _ = jax.eval_shape(lambda p, s, x: f.apply(p, s, None, x, is_training=False),
                                 params, state, images)
    return maps


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_has_a_role(name):
    params, _, _ = traced(name, 42)
    roles = nets.param_roles(name, params)
    assert jax.tree.structure(roles) == jax.tree.structure(params)
    assert set(jax.tree.leaves(roles)) <= set(nets.ROLES)
    head = nets.head_module(name)
    classifier = {m for m, leaves in roles.items()
                  if any(r.startswith("classifier_") for r in leaves.values())}
    assert classifier == ({head} if head else set())
    if head:  # a weight, and a bias where the head has one (ShuffleNet V1's has none)
        assert roles[head]["w"] == "classifier_weight"
        assert set(roles[head].values()) <= {"classifier_weight", "classifier_bias"}


@pytest.mark.parametrize("name", MODELS)
def test_fusion_plan_pairs_or_keeps_every_batchnorm(name):
    """`nets.fusion.plan` traces, and it plans every BatchNorm (every module with running
    statistics): folded into the conv before it, or kept as an affine."""
    params, state, _ = traced(name, 42)
    plan = _fusion_plan(network(name))
    assert set(plan.eps) == set(state)
    assert set(plan.folded) <= set(plan.eps) and set(plan.folded.values()) <= set(params)


@functools.cache
def _fusion_plan(name: str):
    with native_lowering():
        return nets.fusion.plan(name)


WITH_FIGURES = [n for n in CLASSIFIERS if nets.model_info(n).reference_params is not None]


@pytest.mark.parametrize("name", WITH_FIGURES)
def test_counts_equal_the_registry_figures(name):
    """Parameters with a 1000-class head and without, and BN statistic elements (per-channel
    vectors), counted from the abstract trace, equal the registry's reference figures. With a
    1000-class head: the no-head parameters (the 42-class tree without its head, as tested
    above) plus the head's, whose last axis is the classes."""
    info = nets.model_info(name)
    with_head, _, _ = traced(name, 42)
    no_head, state, _ = traced(name, 0)
    head_1000 = sum(int(np.prod(leaf.shape[:-1])) * 1000
                    for leaf in jax.tree.leaves(with_head[nets.head_module(name)]))
    assert (count(no_head) + head_1000, count(no_head), count(state)) == (
        info.reference_params, info.reference_params_no_head, info.reference_bn_stat_elems)
    assert {leaf.ndim for leaf in jax.tree.leaves(state)} <= {1}


# Where the registry follows another reference's convention than its own row's (documented in
# tests/reference/README.md): keras MobileNetV3 without head drops the pre-logits 1x1 conv;
# ours keeps it, as torchvision and timm do, so the no-head figure is torchvision's.
NO_HEAD_ROW = {"keras:MobileNetV3Large": ("torchvision", "mobilenet_v3_large"),
               "keras:MobileNetV3Small": ("torchvision", "mobilenet_v3_small")}


def test_registry_figures_are_the_reference_tables(reference_counts):
    """Every variant whose reference has a row in tests/reference/params.json carries that row's
    figures (the families' own tests also compare the rows of other sources)."""
    checked = set()
    for name in MODELS:
        info = nets.model_info(name)
        row = reference_counts.get(tuple(info.reference.split(":", 1)))
        if row is None:
            continue
        no_head_row = reference_counts[NO_HEAD_ROW.get(info.reference, (row["source"],
                                                                         row["name"]))]
        assert (info.reference_params, info.reference_params_no_head,
                info.reference_bn_stat_elems) == (row["params_with_head"],
                                                  no_head_row["params_no_head"],
                                                  row["bn_stat_elems"]), name
        checked.add(row["source"])
    assert checked == {r["source"] for r in reference_counts.values()}  # rows of every source


def test_reference_files_parse_and_are_consistent():
    """tests/reference/*.json parse; every file is named in the README with its source; the
    official tables' parts add up to their totals."""
    readme = (REFERENCE_DIR / "README.md").read_text()
    files = sorted(p.name for p in REFERENCE_DIR.glob("*.json"))
    assert files == ["efficientdet_official.json", "nfnet_official.json", "params.json"]
    for filename in files:
        assert f"`{filename}`" in readme
        json.loads((REFERENCE_DIR / filename).read_text())
    keys = {"source", "name", "input_res", "params_with_head", "params_no_head", "bn_stat_elems",
            "gmacs"}
    rows = reference_figures("params.json")
    assert all(keys <= set(row) for row in rows)
    assert len({(r["source"], r["name"]) for r in rows}) == len(rows)

    nfnet = reference_figures("nfnet_official.json")["parameter_counts"]["variants"]
    assert sorted(nfnet) == sorted([f"F{k}" for k in range(8)] + [f"F{k}+" for k in range(8)])
    for counts in nfnet.values():
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total")

    detectors = reference_figures("efficientdet_official.json")["variants"]
    assert list(detectors) == [f"D{k}" for k in range(8)] + ["D7x"]
    for d in detectors.values():
        parts = ("backbone", "bifpn", "class_net", "box_net")
        assert d["params"]["total"] == sum(d["params"][p] for p in parts)
        assert d["bn_stat_elems"]["total"] == sum(d["bn_stat_elems"][p] for p in parts)
        assert d["bn_layers"]["total"] == sum(d["bn_layers"][p] for p in parts)


def _cheapest(family):
    """The family's variant with the fewest parameter tensors (a proxy for the program's size,
    so for compile time), then the fewest parameters."""
    members = [n for n in MODELS if nets.model_info(n).family == family]
    return min(members, key=lambda n: (len(jax.tree.leaves(traced(n, 42)[0])),
                                       count(traced(n, 42)[0]), n))


@pytest.fixture
def native_convs(monkeypatch):
    """Native grouped and depthwise convs: XLA:CPU compiles them 3-4x faster than the CPU
    lowerings (which compute the same function and gradient, tests/test_layers.py) and a small
    one-off step is all compile time. (jax_disable_most_optimizations saves compile time here
    but costs as much in run time: NFNet's step runs 10x slower.)"""
    monkeypatch.setenv("NETS_CONV_LOWERING", "native")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_training_step_is_finite_and_every_parameter_gets_a_gradient(family, native_convs):
    """The cheapest variant of each family, in training mode (batch statistics, its own drop
    rates, a fixed key) on 4 random images of 32 px (or its largest feature stride) with random
    parameters (`random_values`, so that no zero-initialised layer blocks a gradient), under
    a loss that reads every output: finite outputs, gradients and new state, and no parameter
    tensor whose gradient is all zeros."""
    name = _cheapest(family)
    info = nets.model_info(name)
    f = nets.transformed(name, num_classes=42)
    params, state, _ = traced(name, 42)
    params, state = random_values((params, state))
    shape = nets.introspect.example_images(name, 4, max(32, *info.feature_strides)).shape
    images = np.random.RandomState(0).randn(*shape).astype(np.float32)

    def loss(params, state, images):
        outputs, new_state = f.apply(params, state, jax.random.key(0), images, is_training=True)
        return sum(jnp.mean(jnp.square(o)) for o in jax.tree.leaves(outputs)), (outputs,
                                                                                 new_state)

    grads, (outputs, new_state) = jax.jit(jax.grad(loss, has_aux=True))(params, state, images)
    if info.task == "classification":
        assert outputs.shape == (4, 42)
    for tree in (outputs, grads, new_state):
        assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)), name
    no_gradient = [jax.tree_util.keystr(path)
                   for path, g in jax.tree_util.tree_leaves_with_path(grads)
                   if not np.abs(g).sum() > 0]
    assert not no_gradient, f"{name}: parameters without gradient: {no_gradient}"
