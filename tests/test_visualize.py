"""tools.visualize: each picture renders to a PNG of its grid's size with something drawn."""

import json

import jax
import numpy as np
import pytest

import nets
from tests.helpers import random_images, random_variables
from tools import visualize

plt = pytest.importorskip("matplotlib.pyplot")


@pytest.fixture(scope="module")
def resnet18():
    f = nets.transformed("resnet18", 10)
    return random_variables(f, nets.introspect.example_images("resnet18", 1, 32))


def _png(path):
    pixels = plt.imread(path)
    assert pixels.std() > 0, "blank image"
    return pixels.shape[:2]  # (height, width)


def test_feature_maps(resnet18, tmp_path):
    """Stages and any module by its path: layer2_0.conv1's 128 channels at 1/8 of the input
    (the conv's output, computed again by hand from the stage-1 map: 3x3, stride 2)."""
    params, state = resnet18
    image = random_images(1, 32)[0]
    layers = ("stage1", "layer2_0.conv1", "stage4")
    path = visualize.feature_maps("resnet18", params, state, image, str(tmp_path / "maps.png"),
                                  layers=layers, k=8)
    assert _png(path) == (3 * visualize.PANEL_PX, 8 * visualize.PANEL_PX)
    maps = visualize._maps("resnet18", params, state, image[None], layers, {})
    assert maps["layer2_0.conv1"].shape == (1, 4, 4, 128)
    expected = jax.lax.conv_general_dilated(
        maps["stage1"], params["resnet/layer2_0/conv1"]["w"], (2, 2), ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(maps["layer2_0.conv1"], expected, atol=1e-4)
    with pytest.raises(ValueError, match="no feature map or module.*stage5.*stage1"):
        visualize.feature_maps("resnet18", params, state, image, str(tmp_path / "x.png"),
                               layers=("stage5",))
    with pytest.raises(ValueError, match="no feature map or module.*layer2_0.conv9.*"
                                         "close paths.*layer2_0.conv1"):
        visualize.feature_maps("resnet18", params, state, image, str(tmp_path / "x.png"),
                               layers=("layer2_0.conv9",))
    se_params, se_state = nets.introspect.shapes("seresnet50")  # checked before computing
    with pytest.raises(ValueError, match=r"'layer1_0.se.fc1' outputs \(1, 16\), not a map"):
        visualize._maps("seresnet50", se_params, se_state, image[None], ("layer1_0.se.fc1",), {})
    with pytest.raises(ValueError, match="stacked blocks.*scan_blocks=False"):
        visualize._maps("nfnet_f0", {}, {}, image[None], ("stage1_blocks.conv1",), {})
    with pytest.raises(ValueError, match="channels"):
        visualize.feature_maps("resnet18", params, state, random_images(1, 32, channels=1)[0],
                               str(tmp_path / "x.png"))


def test_kernel_statistics_are_numpys(resnet18):
    params, _ = resnet18
    rows = {(r.module, r.leaf): r for r in visualize.kernel_statistics(params)}
    w = np.asarray(params["resnet/layer2_0/conv1"]["w"], np.float64)
    r = rows["layer2_0.conv1", "w"]
    assert r.shape == w.shape
    np.testing.assert_allclose([r.mean, r.std, r.min, r.max],
                               [w.mean(), w.std(), w.min(), w.max()], rtol=1e-12)
    assert len(rows) == sum(len(leaves) for leaves in params.values())
    assert "layer2_0.conv1" in visualize.format_statistics(list(rows.values()))


def test_kernel_histograms(resnet18, tmp_path):
    params, _ = resnet18
    path = visualize.kernel_histograms(params, str(tmp_path / "hist.png"), max_layers=6)
    width, height = visualize.HIST_PX
    assert _png(path) == (2 * height, visualize.HIST_COLUMNS * width)


def test_first_layer_filters(resnet18, tmp_path):
    params, _ = resnet18
    path = visualize.first_layer_filters(params, str(tmp_path / "filters.png"))
    # resnet18's conv1: 64 filters of 7x7x3 on an 8 x 8 grid.
    assert _png(path) == (8 * visualize.FILTER_PX, 8 * visualize.FILTER_PX)
    with pytest.raises(ValueError, match="not a conv with 3 input channels"):
        visualize.first_layer_filters(params, str(tmp_path / "x.png"), module="fc")


def test_training_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "train/loss": 2.0 / s, "lr": 0.1 * s} for s in range(1, 6)]
    lines.append({"step": 5, "eval/top1": 0.5})
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert visualize.read_metrics(str(metrics))["eval/top1"] == ([5], [0.5])
    path = visualize.training_curves(str(metrics), str(tmp_path / "curves.png"))
    width, height = visualize.CURVE_PX
    assert _png(path) == (height, 3 * width)
    path = visualize.training_curves(str(metrics), str(tmp_path / "loss.png"), ["train/loss"])
    assert _png(path) == (height, width)
    with pytest.raises(ValueError, match="no scalar.*top5"):
        visualize.training_curves(str(metrics), str(tmp_path / "x.png"), ["top5"])


def test_command(resnet18, tmp_path, monkeypatch):
    import tools.export

    # The command's random init compiles slowly on CPU; the fixture's variables stand in.
    monkeypatch.setattr(tools.export, "load_variables", lambda *args: resnet18)
    out = tmp_path / "f.png"
    visualize.main(["filters", "resnet18", "--out", str(out)])
    assert _png(str(out)) == (8 * visualize.FILTER_PX, 8 * visualize.FILTER_PX)
    np.save(tmp_path / "image.npy", random_images(1, 32)[0])
    visualize.main(["features", "resnet18", "--image", str(tmp_path / "image.npy"),
                    "--out", str(out), "--layers", "stage2", "-k", "4"])
    assert _png(str(out)) == (visualize.PANEL_PX, 4 * visualize.PANEL_PX)
