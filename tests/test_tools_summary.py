"""tools.summary: per-module rows whose totals are the reference figures."""

import pytest

import nets
from bench.inference import multiply_adds
from tools import summary as summary_tool


@pytest.mark.parametrize("name,size,source", [("resnet50", 224, "torchvision"),
                                              ("mobilenet_v3_small", 224, "torchvision")])
def test_totals_equal_the_reference_figures(name, size, source, reference_counts):
    rows = summary_tool.summary(name, size)
    params, macs = summary_tool.totals(rows)
    assert params == nets.model_info(name).reference_params
    assert macs == multiply_adds(name, size)
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
    assert macs == multiply_adds("p3d_resnet50", 64)
    assert rows[0].output_shapes == ((1, 1000),)


def test_format_table_and_command(capsys):
    rows = summary_tool.summary("resnet18", 64, num_classes=10)
    table = summary_tool.format_table(rows)
    params, macs = summary_tool.totals(rows)
    assert f"{params:,}" in table.splitlines()[-2] and f"{macs:,}" in table.splitlines()[-2]
    assert "layer1_0.conv1" in table and "1x16x16x64" in table
    summary_tool.main(["resnet18", "--size", "64", "--num-classes", "10"])
    assert capsys.readouterr().out.strip() == table


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet5'.*resnet50"):
        summary_tool.summary("resnet5")
