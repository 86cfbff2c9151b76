"""tools.predict, tools.evaluate and tools.export for detectors (a reduced efficientdet_d0 at
64 px, random weights): drawn PNGs and their JSON are the library's detections, evaluation is the
detection task's COCO mAP over the built-in test split, and the exported artifact with its
post-processing runs without this package and gives the in-process detections."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import detection
import nets
from data import builtin_detection
from data import detection as detection_data
from tests.helpers import random_variables
from tools import evaluate, export, predict
from training import detection as detection_task

NAME = "efficientdet_d0"
REDUCED = dict(backbone=(0.25, 0.1), fpn_width=16, fpn_cells=1, head_repeats=1)
NUM_CLASSES = 10
SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def native_convs():
    """XLA's own depthwise convs compile several times faster than the CPU lowering's shifted
    multiply-adds, and at 64 px they run as fast."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NETS_CONV_LOWERING", "native")
        yield


@pytest.fixture(scope="module")
def variables():
    f = nets.transformed(NAME, NUM_CLASSES, **REDUCED)
    return random_variables(f, jnp.zeros((1, SIZE, SIZE, 3)))


@pytest.fixture(scope="module")
def weights(variables, tmp_path_factory):
    """A weights file of the reduced detector, its eval size 64 px, named classes."""
    params, state = variables
    preprocessing = nets.weights.reference_eval_preprocessing(NAME)
    preprocessing["test_size"] = SIZE
    path = tmp_path_factory.mktemp("weights") / "d0.safetensors"
    nets.weights.save(path, params, state, model=NAME, overrides=REDUCED,
                      eval_preprocessing=preprocessing,
                      class_names=[f"digit {i}" for i in range(NUM_CLASSES)])
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in {"wide.png": (50, 90), "tall.jpg": (120, 70)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(directory / name)
        paths.append(str(directory / name))
    return paths


def test_predict_draws_and_lists_the_librarys_detections(weights, images, tmp_path, capsys):
    out = tmp_path / "drawn"
    done = predict.main([*images, "--weights", weights, "--threshold", "0", "--out", str(out)])
    assert "class-agnostic (official inference) gaussian NMS" in capsys.readouterr().out
    library = predict.detect(images, weights, threshold=0.0)
    listed = json.loads((out / predict.DETECTIONS_JSON).read_text())
    assert [entry["detections"] for entry in listed["images"]] == library
    for path, entry, result in zip(images, listed["images"], done):
        source = Image.open(path)
        drawn = Image.open(entry["output"])
        assert entry["image"] == path and drawn.size == source.size
        assert (entry["height"], entry["width"]) == (source.height, source.width)
        assert entry["detections"], "threshold 0: every valid detection is kept"
        # Something was drawn over the image.
        assert np.any(np.asarray(drawn) != np.asarray(source.convert("RGB")))
        for d in entry["detections"]:
            ymin, xmin, ymax, xmax = d["box"]
            assert 0 <= ymin < ymax <= source.height and 0 <= xmin < xmax <= source.width
            assert d["name"] == f"digit {d['class'] - 1}" and 0 <= d["score"] <= 1
        assert [d.score for d in result.detections] == sorted(
            (d.score for d in result.detections), reverse=True)


def test_detections_are_the_models_postprocessed_outputs(weights, variables, images):
    """The library's detections: the eval preprocessing, the forward and the official inference
    post-processing, boxes back in original pixels (computed here step by step)."""
    params, state = variables
    loaded = evaluate.load_detector(weights)
    recipe = detection_data.Recipe.from_config(loaded.data)
    pixels = np.asarray(Image.open(images[1]).convert("RGB"))
    prepared, scale = detection_data.eval_example(pixels, recipe)
    f = nets.transformed(NAME, NUM_CLASSES, **REDUCED)

    @jax.jit
    def official_inference(images, image_scales):
        out, _ = f.apply(params, state, None, images, is_training=False)
        return detection.generate_detections(out["class"], out["box"], loaded.anchors,
                                             NUM_CLASSES, image_scales, per_class=False,
                                             max_nms_inputs=0, image_size=(SIZE, SIZE))

    found = official_inference(prepared[None], 1 / np.float32(scale)[None])
    keep = np.asarray(found.valid[0] & (found.scores[0] >= 0.3))
    boxes = np.clip(np.asarray(found.boxes[0]), 0, [120, 70, 120, 70])[keep]
    keep_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    _, ours = predict.detect(images, weights, threshold=0.3)
    assert ours, "random weights score above 0.3 here"
    np.testing.assert_allclose([d["box"] for d in ours], boxes[keep_area], atol=1e-3)
    np.testing.assert_allclose([d["score"] for d in ours],
                               np.asarray(found.scores[0])[keep][keep_area], atol=1e-5)
    assert predict.detect(images, weights, threshold=1.0) == [[], []]
    # The COCO evaluation's post-processing (top 5000 (anchor, class) pairs, NMS per class) is
    # an option: more than each anchor's best class, so other detections.
    per_class = predict.detect(images, weights, threshold=0.0, per_class=True, nms="hard")
    default = predict.detect(images, weights, threshold=0.0)
    for found, agnostic in zip(per_class, default):
        assert found and found != agnostic
        assert all(1 <= d["class"] <= NUM_CLASSES for d in found)


def test_predict_reports_unreadable_images_and_wrong_options(weights, images, tmp_path,
                                                            capsys):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(SystemExit) as exit_:
        predict.main([images[0], str(tmp_path / "notes.png"), "--weights", weights, "--out",
                      str(tmp_path / "drawn"), "--threshold", "0.5"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out.splitlines()
    (unreadable,) = [line for line in out if "unreadable" in line]
    assert "notes.png: not an image file" in unreadable
    assert (tmp_path / "drawn" / "wide.png").exists()
    for argv, message in ((["--top", "3"], "--top applies to classifiers"),
                          (["--crop_fraction", "0.9"], "--crop_fraction does not apply"),
                          (["--threshold", "2"], "--threshold must be in [0, 1]")):
        with pytest.raises(SystemExit) as exit_:
            predict.main([images[0], "--weights", weights, "--out", str(tmp_path), *argv])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_gives_coco_metrics_on_the_builtin_test_split(weights, tmp_path,
                                                               detection_data_dir, capsys):
    data_dir = detection_data_dir
    out = tmp_path / "eval.json"
    result = evaluate.main(["--weights", weights, "--data_dir", data_dir, "--batch", "100",
                            "--out", str(out)])
    assert result["data"] == builtin_detection.NAME and result["split"] == "test"
    assert result["count"] == builtin_detection.NUM_CANVASES["test"] == 300
    assert result["nms"] == "gaussian" and result["preprocessing"]["test_size"] == SIZE
    for name in detection.COCO_METRIC_NAMES:
        assert -1 <= result[name] <= 1
    assert json.loads(out.read_text()) == result
    printed = capsys.readouterr().out
    assert "COCO mAP" in printed and "AP50" in printed and "ARmax100" in printed


def test_evaluate_refuses_a_dataset_of_other_classes(weights, tmp_path, capsys):
    """A coco_json dataset whose category ids go beyond the head: one line."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    Image.new("RGB", (32, 32)).save(root / "val" / "a.png")
    (root / "annotations" / "instances_val.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 12, "bbox": [1, 1, 8, 8]}],
        "categories": [{"id": 12, "name": "twelve"}]}))
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--weights", weights, "--data", "coco_json", "--data_dir", str(root)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "more classes than the weights' head" in err and "Traceback" not in err


# Runs in a fresh interpreter: only jax and numpy, and it checks that nothing else came in.
LOADER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    run = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read())).call
    inputs = np.load(sys.argv[2])
    out = run(inputs["images"], inputs["scales"])
    np.savez(sys.argv[3], **{k: np.asarray(v) for k, v in out.items()})
    assert not any(m == "nets" or m.startswith(("nets.", "haiku", "tools", "detection"))
                   for m in sys.modules)
""")


def test_exported_detector_gives_the_in_process_detections(weights, variables, images,
                                                           tmp_path, capsys):
    params, state = variables
    path = tmp_path / "d0.jaxexport"
    export.main([NAME, "--weights", weights, "--out", str(path)])   # size: the weights' 64
    assert "wrote" in capsys.readouterr().out
    loaded = evaluate.load_detector(weights)
    recipe = detection_data.Recipe.from_config(loaded.data)
    prepared, scales = [], []
    for image in images:
        pixels = np.asarray(Image.open(image).convert("RGB"))
        x, scale = detection_data.eval_example(pixels, recipe)
        prepared.append(x)
        scales.append(1 / scale)
    inputs = {"images": np.stack(prepared), "scales": np.asarray(scales, np.float32)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    subprocess.run([sys.executable, "-c", LOADER, str(path), str(tmp_path / "inputs.npz"),
                    str(tmp_path / "out.npz")], check=True)
    exported = np.load(tmp_path / "out.npz")
    f = nets.transformed(NAME, NUM_CLASSES, **REDUCED)
    detect = detection_task.detections_fn(f, loaded.anchors, NUM_CLASSES, per_class=False)
    expected = jax.jit(detect)(params, state, inputs["images"], inputs["scales"])
    assert set(exported.files) == {"boxes", "scores", "classes", "valid"}
    assert exported["boxes"].shape == (2, 100, 4)
    np.testing.assert_array_equal(exported["valid"], expected["valid"])
    np.testing.assert_array_equal(exported["classes"], expected["classes"])
    np.testing.assert_allclose(exported["scores"], expected["scores"], atol=1e-5)
    np.testing.assert_allclose(exported["boxes"], expected["boxes"], atol=1e-3)
    # The artifact's post-processing is predict's: its valid rows above 0.3, clipped to the
    # image, are predict's detections.
    for image, ours, boxes, scores, valid in zip(
            images, predict.detect(images, weights, threshold=0.3), exported["boxes"],
            exported["scores"], exported["valid"]):
        h, w = Image.open(image).size[::-1]
        boxes = np.clip(boxes, 0, [h, w, h, w])
        keep = valid & (scores >= 0.3) & (boxes[:, 2] > boxes[:, 0]) & (
            boxes[:, 3] > boxes[:, 1])
        np.testing.assert_allclose([d["box"] for d in ours], boxes[keep], atol=1e-3)
        np.testing.assert_allclose([d["score"] for d in ours], scores[keep], atol=1e-5)
