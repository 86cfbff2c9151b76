"""NFNet: counts per role against the official code's (tests/reference/nfnet_official.json),
the block table, signal variance, timm equivalence and the official checkpoint layout."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from nets import nfnet
from tests import reference
from tests.helpers import (jitted_apply, jitted_logits_and_features, random_images,
                           reference_figures)

# Figures measured on the official NFNet code (tests/reference/nfnet_official.json, which names
# the sections of the NFNet spec they come from).
OFFICIAL = reference_figures("nfnet_official.json")

# §9 per official variant (F0..F7, F0+..F7+; ours nfnet_f0..nfnet_f7plus): total, stem conv w,
# block conv w, final conv w, WS gains, WS biases, skip gains, SE w, SE b, fc w, fc b.
SPEC_COUNTS = {f"nfnet_{variant.lower().replace('+', 'plus')}": tuple(counts.values())
               for variant, counts in OFFICIAL["parameter_counts"]["variants"].items()}


def _counts_by_role(params):
    counts = dict.fromkeys(("stem_w", "block_w", "final_w", "gain", "bias", "skip", "se_w",
                            "se_b", "fc_w", "fc_b"), 0)
    for module, leaves in params.items():
        for leaf, value in leaves.items():
            n = int(np.prod(value.shape))
            if "/se/" in module:
                counts["se_w" if leaf == "w" else "se_b"] += n
            elif module.endswith("/linear"):
                counts["fc_w" if leaf == "w" else "fc_b"] += n
            elif leaf == "w":
                key = ("stem_w" if "stem_conv" in module else
                       "final_w" if module.endswith("final_conv") else "block_w")
                counts[key] += n
            else:
                counts[{"gain": "gain", "bias": "bias", "skip_gain": "skip"}[leaf]] += n
    return (sum(counts.values()), *counts.values())


@pytest.mark.parametrize("name", sorted(SPEC_COUNTS))
def test_parameter_counts_by_role_equal_the_official_code(name):
    params, state = nets.introspect.shapes(name)
    assert _counts_by_role(params) == SPEC_COUNTS[name]
    assert state == {}
    info = nets.model_info(name)
    assert info.reference_params == SPEC_COUNTS[name][0]
    no_head, _ = nets.introspect.shapes(name, 0)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(no_head)) == (
        info.reference_params_no_head)


@pytest.mark.parametrize("k", range(7))
def test_counts_equal_timms_dm_nfnet(k, reference_counts):
    row = reference_counts[("timm", f"dm_nfnet_f{k}")]
    info = nets.model_info(f"nfnet_f{k}")
    assert (info.reference_params, info.reference_params_no_head) == (
        row["params_with_head"], row["params_no_head"])


@pytest.mark.parametrize("plus", [False, True])
def test_variants_are_the_official_table(plus):
    """§1: depths, train / test sizes and dropout per variant; a "+" variant copies its base's."""
    for variant, row in OFFICIAL["variant_table"]["variants"].items():
        info = nets.model_info(f"nfnet_{variant.lower()}{'plus' if plus else ''}")
        assert (list(info.config["depths"]), info.train_size, info.test_size,
                info.config["drop_rate"]) == (row["depths"], row["train_px"], row["test_px"],
                                              row["dropout"]), variant


def test_block_table_of_f0():
    specs = nfnet.block_table((1, 2, 6, 3), nfnet.WIDTHS)
    # §3.1, measured on the official code (to 4 decimals).
    np.testing.assert_allclose([s.beta for s in specs], OFFICIAL["f0_block_betas"]["values"],
                               atol=1e-4)
    np.testing.assert_allclose([s.stochastic_depth_rate for s in specs],
                               [0.25 * i / 12 for i in range(12)])
    assert [s.stride for s in specs] == [1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
    assert [s.projection for s in specs] == [s.index == 0 for s in specs]
    assert [(s.width, s.groups) for s in specs if s.index == 0] == [
        (128, 1), (256, 2), (768, 6), (768, 6)]
    assert specs[0].in_channels == 128


def test_plus_variants_round_the_first_stage_width_down_to_whole_groups():
    specs = nfnet.block_table((1, 2, 6, 3), nfnet.WIDTHS_PLUS)
    assert [(s.width, s.groups) for s in specs if s.index == 0] == [
        (128, 1), (384, 3), (1024, 8), (1024, 8)]
    assert specs[0].in_channels == 192


def test_every_block_preserves_the_expected_signal_variance():
    """The property NFNets exist for: with SkipInit gains at 1, a block fed a signal of variance
    expected_std^2 outputs variance expected_std^2 + alpha^2 (after a transition block: 1 +
    alpha^2). Inputs are Gaussian, constant over aligned 2x2 patches so that the transition's
    average pool keeps their variance as it keeps a natural image's. Tolerance 5%."""
    rng = np.random.RandomState(0)
    for spec in nfnet.block_table((1, 2, 6, 3), nfnet.WIDTHS):
        e_in = 1.0 / spec.beta
        x = rng.randn(4, 6, 6, spec.in_channels).astype(np.float32) * e_in
        x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
        f = hk.transform(lambda x, s=spec: nfnet.NFBlock(s, 0.2, 0.5, "gelu", "official")(
            x, s.beta, 0.0, is_training=False))
        params = f.init(jax.random.key(spec.stage * 10 + spec.index), x)
        params = jax.tree.map(lambda v: jnp.ones_like(v) if v.ndim == 0 else v, params)
        expected = (1.0 if spec.index == 0 else e_in ** 2) + 0.2 ** 2
        measured = float(jnp.var(f.apply(params, None, x)))
        assert abs(measured / expected - 1) < 0.05, (spec, measured, expected)


def _jaxpr_size(name):
    f = nets.transformed(name, num_classes=10)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    params, state = jax.eval_shape(lambda x: f.init(jax.random.key(0), x, is_training=True), x)
    jaxpr = jax.make_jaxpr(lambda p, s, x: f.apply(p, s, jax.random.key(0), x,
                                                   is_training=True))(params, state, x)
    return len(jaxpr.jaxpr.eqns)


def test_the_traced_program_does_not_grow_with_depth():
    """Repeated blocks run under a scan, so F7 (96 blocks) traces to the program of F1 (24);
    F0's is a little smaller only because its first stage has a single block."""
    f0, f1, f7 = (_jaxpr_size(f"nfnet_f{k}") for k in (0, 1, 7))
    assert f7 == f1 and f7 < 1.05 * f0


def _primitives(jaxpr, found=None):
    """Names of every primitive in a jaxpr, nested ones (scan, remat, jit bodies) included."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _primitives(inner, found)
    return found


def test_remat_rematerialises_blocks_without_changing_parameters():
    plain, _ = nets.introspect.shapes("nfnet_f0", 10)
    remat, _ = nets.introspect.shapes("nfnet_f0", 10, remat=True)
    assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, remat)

    def primitives(**options):
        f = nets.transformed("nfnet_f0", num_classes=10, **options)
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        loss = lambda p, x: f.apply(p, {}, jax.random.key(0), x, is_training=True)[0].sum()
        return _primitives(jax.make_jaxpr(loss)(plain, x).jaxpr)

    assert "remat2" in primitives(remat=True) and "remat2" not in primitives()


def test_param_roles_mark_the_classifier_gains_biases_and_skip_gains():
    params, _ = nets.introspect.shapes("nfnet_f0")
    roles = nets.param_roles("nfnet_f0", params)
    assert roles["nfnet/linear"] == {"w": "classifier_weight", "b": "classifier_bias"}
    assert roles["nfnet/stage3_blocks/block"] == {"skip_gain": "skip_gain"}
    assert roles["nfnet/stage3_blocks/block/conv1"] == {"w": "weight", "gain": "gain",
                                                        "bias": "bias"}
    assert roles["nfnet/stage3_blocks/block/se/fc1"] == {"w": "weight", "b": "bias"}
    flat = jax.tree.leaves(roles)
    # §10.1, F0: gains + biases + skip gains (group A, with the classifier bias).
    sizes = jax.tree.leaves(jax.tree.map(lambda s: int(np.prod(s.shape)), params))
    group_a = sum(n for n, r in zip(sizes, flat) if r in ("gain", "bias", "skip_gain",
                                                          "classifier_bias"))
    assert group_a == OFFICIAL["f0_optimizer_groups"]["gains_biases"]


def _timm_f0():
    torch = reference.torch()
    torch.manual_seed(0)
    model = reference.timm().create_model("dm_nfnet_f0").eval()
    with torch.no_grad():
        for key, value in model.named_parameters():
            if key.endswith("skipinit_gain"):  # zero at init: every block would be a shortcut
                value.uniform_(0.5, 1.0)
            elif key.endswith((".gain", "conv.bias", "conv1.bias", "conv2.bias", "conv2b.bias",
                               "conv3.bias")):
                value.add_(torch.randn_like(value) * 0.1)
            elif key == "head.fc.weight":  # N(0, 0.01) gives logits too small to compare
                value.mul_(30.0)
    return model


TIMM_NUMERICS = dict(activation="gelu_exact", ws_convention="timm")


def test_logits_and_stage_maps_equal_timm_dm_nfnet_f0():
    """timm's dm_nfnet differs from the official code in two documented details: exact (erf)
    GELU instead of the tanh approximation, and WSConv eps 1e-5 added to the variance instead
    of 1e-4 flooring N * var. With both set to timm's, outputs agree to float32 rounding."""
    torch = reference.torch()
    model = _timm_f0()
    images = random_images(2, 64)
    maps = {}
    for i in range(4):
        model.stages[i].register_forward_hook(
            lambda m, inp, out, i=i: maps.__setitem__(f"stage{i + 1}",
                                                      out.numpy().transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    params, state = nets.convert.from_torch("nfnet_f0", model.state_dict(), **TIMM_NUMERICS)
    (logits, ours), _ = jitted_logits_and_features("nfnet_f0", **TIMM_NUMERICS)(
        params, state, None, images)
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    for stage, ref_map in maps.items():
        np.testing.assert_allclose(ours[stage], ref_map, atol=1e-4, rtol=1e-4, err_msg=stage)


def _random_params(name, num_classes):
    """Random parameters of the variant's shapes, without running its init."""
    shapes, _ = nets.introspect.shapes(name, num_classes)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_official_layout_round_trip_and_names():
    params = _random_params("nfnet_f1", 10)
    official = nets.convert.to_nfnet_official("nfnet_f1", params)
    # F1 has 24 blocks: nf_block, nf_block_1, ..., nf_block_23.
    assert "NFNet/~/nf_block_23/~/conv1b" in official and "NFNet/~/nf_block_24" not in official
    assert official["NFNet/~/nf_block_3/~/conv1"]["w"].shape == (3, 3, 128, 256)
    assert official["NFNet/~/nf_block_3"]["skip_gain"].shape == ()
    assert official["NFNet/~/nf_block_3/~/squeeze_excite/~/linear_1"]["w"].shape == (256, 512)
    assert official["NFNet/~/linear"]["w"].shape == (3072, 10)
    back, state = nets.convert.from_nfnet_official("nfnet_f1", official)
    assert state == {}
    jax.tree.map(np.testing.assert_array_equal, back, params)
    # Flat keys, with or without Haiku's "~" markers, load the same.
    flat = {f"{m.replace('/~/', '/')}/{leaf}": v for m, leaves in official.items()
            for leaf, v in leaves.items()}
    again, _ = nets.convert.from_nfnet_official("nfnet_f1", flat)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_official_checkpoint_of_another_variant_is_rejected_with_the_difference():
    official = nets.convert.to_nfnet_official("nfnet_f1", _random_params("nfnet_f1", 10))
    with pytest.raises(ValueError, match=r"(?s)into nfnet_f0 .*unexpected \(\d+\): "
                                         r"NFNet/nf_block_12/"):
        nets.convert.from_nfnet_official("nfnet_f0", official)
    with pytest.raises(ValueError, match="not an NFNet"):
        nets.convert.from_nfnet_official("resnet50", official)


def test_activation_and_convention_options_are_checked():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="unknown NFNet activation 'swish'"):
        nets.transformed("nfnet_f0", activation="swish").init(jax.random.key(0), x,
                                                               is_training=True)
    with pytest.raises(ValueError, match="ws_convention must be one of"):
        nets.transformed("nfnet_f0", ws_convention="tf").init(jax.random.key(0), x,
                                                              is_training=True)
    np.testing.assert_allclose(nfnet.scaled_activation("relu")(jnp.array([-1.0, 2.0])),
                               [0.0, 2 * 1.7139588594436646])


def test_unrolled_blocks_compute_what_scanned_blocks_do():
    params = _random_params("nfnet_f0", 10)
    params = jax.tree.map(lambda v: v * 0.1, params)
    images = random_images(1, 32)
    scanned, _ = jitted_apply("nfnet_f0", 10)(params, {}, None, images, is_training=False)
    unrolled, _ = jitted_apply("nfnet_f0", 10, scan_blocks=False)(params, {}, None, images,
                                                                 is_training=False)
    assert np.abs(scanned).max() > 1e-3
    np.testing.assert_allclose(unrolled, scanned, rtol=1e-5, atol=1e-6)
