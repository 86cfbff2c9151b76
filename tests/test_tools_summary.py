"""tools.summary: per-module rows whose totals are the reference figures."""

import math
import os
from unittest import mock

import jax
import pytest
from jax.extend import core as jax_core

import nets
from tests import reference
from tools import summary as summary_tool


def torch_multiply_adds(reference_name: str, size: int) -> int:
    """MACs of the torchvision reference model on one image: torch's FlopCounterMode FLOPs / 2
    (convs and matmuls only), traced on the meta device, so nothing is computed."""
    torch = reference.torch()
    torchvision = reference.torchvision()
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = getattr(torchvision.models, reference_name)().eval()
        images = torch.empty(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        model(images)
    return counter.get_total_flops() // 2


def jaxpr_multiply_adds(name: str, size: int) -> int:
    """MACs of one example counted from the traced eval forward's jaxpr, independently of the
    summary's module walk: every conv_general_dilated (output elements x kernel taps x input
    channels per group) and dot_general (output elements x contracted size), under the
    native conv lowering (convs stay convs), scan bodies counted once per step."""
    images = nets.introspect.example_images(name, 1, size)
    f = nets.transformed(name)
    params, state = jax.eval_shape(
        lambda x: f.init(jax.random.key(0), x, is_training=True), images)
    with mock.patch.dict(os.environ, {"NETS_CONV_LOWERING": "native"}):
        closed = jax.make_jaxpr(lambda p, s, x: f.apply(p, s, None, x, is_training=False))(
            params, state, images)

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            out_elements = math.prod(eqn.outvars[0].aval.shape)
            if eqn.primitive.name == "conv_general_dilated":
                kernel = eqn.invars[1].aval.shape
                rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, *spatial)
                total += out_elements * math.prod(kernel[d] for d in rhs_spec[1:])
            elif eqn.primitive.name == "dot_general":
                (contracting, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += out_elements * math.prod(lhs[d] for d in contracting)
            steps = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
            total += steps * sum(count(sub) for sub in jax_core.jaxprs_in_params(eqn.params))
        return total

    return count(closed.jaxpr)


@pytest.mark.parametrize("name,size,source", [("resnet50", 224, "torchvision"),
                                              ("mobilenet_v3_small", 224, "torchvision")])
def test_totals_equal_the_reference_figures(name, size, source, reference_counts):
    rows = summary_tool.summary(name, size)
    params, macs = summary_tool.totals(rows)
    assert params == nets.model_info(name).reference_params
    # Exactly torch's count on the torchvision model (params.json rounds to 1e-3 GMACs).
    assert nets.model_info(name).reference == f"{source}:{name}"
    assert macs == torch_multiply_adds(name, size)
    assert macs / 1e9 == pytest.approx(reference_counts[(source, name)]["gmacs"], abs=6e-4)
    # Rows are per module, not one lump: the first conv and the head carry their own shares.
    by_module = {r.module: r for r in rows}
    head = by_module[nets.model_info(name).classifier]
    assert head.params == head.macs + head.output_shapes[0][-1]  # w (in x out) + b (out)
    assert sum(r.macs > 0 for r in rows) > 20


def test_layer_stacks_count_every_block(reference_counts):
    """NFNet stages run under hk.layer_stack; each stacked block's MACs and parameters count
    (params.json: timm's dm_nfnet_f0 at its 192 px)."""
    row = reference_counts[("timm", "dm_nfnet_f0")]
    rows = summary_tool.summary("nfnet_f0", row["input_res"])
    params, macs = summary_tool.totals(rows)
    assert params == nets.model_info("nfnet_f0").reference_params
    assert macs / 1e9 == pytest.approx(row["gmacs"], abs=6e-4)
    assert params == nets.introspect.count_params("nfnet_f0")


def test_video_model_takes_clips():
    rows = summary_tool.summary("p3d_resnet50", 64)
    params, macs = summary_tool.totals(rows)
    assert params == nets.introspect.count_params("p3d_resnet50")
    # No reference library has P3D: the MACs are recounted from the traced jaxpr's 3-D convs
    # and matmuls (1.35 GMACs for a 16-frame 64 px clip).
    assert macs == jaxpr_multiply_adds("p3d_resnet50", 64) == 1_352_613_888
    assert rows[0].output_shapes == ((1, 1000),)


def test_format_table_and_command(capsys):
    rows = summary_tool.summary("resnet18", 64, num_classes=10)
    table = summary_tool.format_table(rows)
    params, macs = summary_tool.totals(rows)
    assert f"{params:,}" in table.splitlines()[-2] and f"{macs:,}" in table.splitlines()[-2]
    assert "layer1_0.conv1" in table and "1x16x16x64" in table
    # By hand: the first block's 3x3 conv, 64 -> 64 channels on 16x16 pixels.
    conv1 = next(r for r in rows if r.module == "layer1_0.conv1")
    assert conv1.macs == 16 * 16 * 3 * 3 * 64 * 64 and conv1.params == 3 * 3 * 64 * 64
    summary_tool.main(["resnet18", "--size", "64", "--num-classes", "10"])
    assert capsys.readouterr().out.strip() == table


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet5'.*resnet50"):
        summary_tool.summary("resnet5")
