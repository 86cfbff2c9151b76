"""tools.evaluate and tools.predict: a short run's weights give the trainer's own accuracy, through
its workdir and through a converted file; predictions are evaluation's; bad input is one line."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
import nets
from data import sources
from experiments import resnet18
from tools import convert, evaluate, predict
from training import loop

STEPS = 60


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    data.prepare_builtin(str(path))
    return str(path)


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    """A short resnet18 run on the built-in dataset at 16 px, with an EMA: (workdir, its final
    eval row of metrics.jsonl)."""
    config = resnet18.get_config("local")
    config.update(dict(num_steps=STEPS, batch_size=32, ema_decay=0.9, log_every=STEPS,
                       checkpoint_every=STEPS, eval_batch_size=120))
    config.optimizer.update(dict(base_lr=0.8, warmup_epochs=0.0))
    config.data.update(dict(data_dir=data_dir, train_size=16, test_size=16))   # :local's is 32
    workdir = tmp_path_factory.mktemp("run")
    loop.run(config, str(workdir))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in rows if "eval/top1" in r]
    assert final["step"] == STEPS
    return workdir, final


@pytest.mark.parametrize("ema", [False, True], ids=["params", "ema"])
def test_evaluating_a_workdir_gives_the_trainers_numbers(run, data_dir, ema):
    workdir, logged = run
    prefix = "eval_ema" if ema else "eval"
    result = evaluate.evaluate(workdir, "sklearn_digits", data_dir=data_dir, ema=ema)
    assert result["split"] == "test" and result["count"] == 360
    # The same examples, preprocessing and model: the same correct counts (the batch differs
    # from the trainer's 120, so the loss sum differs only in rounding).
    assert result["top1"] == logged[f"{prefix}/top1"]
    assert result["top5"] == logged[f"{prefix}/top5"]
    assert result["loss"] == pytest.approx(logged[f"{prefix}/loss"], rel=1e-5)
    assert result["preprocessing"]["test_size"] == 16
    assert "run's config" in result["preprocessing_from"]
    per_class = result["per_class"]
    assert [c["name"] for c in per_class] == list(sources._builder(
        "sklearn_digits", data_dir).info.features["label"].names) == [str(i) for i in range(10)]
    counts = np.bincount([sources.open_source("sklearn_digits", "test", data_dir)[i]["label"]
                          for i in range(360)], minlength=10)
    assert [c["count"] for c in per_class] == list(counts)
    assert sum(c["top1"] * c["count"] for c in per_class) / 360 == pytest.approx(result["top1"])


def test_a_batch_that_does_not_divide_the_split_counts_every_example_once(run, data_dir):
    workdir, logged = run
    result = evaluate.evaluate(workdir, "sklearn_digits", data_dir=data_dir, batch_size=7)
    assert result["count"] == 360 and result["top1"] == logged["eval/top1"]


def test_a_converted_file_carries_the_runs_preprocessing_and_names(run, data_dir, tmp_path,
                                                                   monkeypatch):
    workdir, logged = run
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)   # where convert looks up the class names
    path = tmp_path / "run.safetensors"
    convert.main(["--from", "checkpoint", str(workdir), "--ema", "--out", str(path)])
    meta = nets.weights.read_metadata(path)
    assert meta["eval_preprocessing"]["test_size"] == 16
    assert meta["eval_preprocessing"]["crop_fraction"] == 1.0
    assert meta["class_names"] == [str(i) for i in range(10)]
    lines = []
    result = evaluate.evaluate(path, "sklearn_digits", data_dir=data_dir, log=lines.append)
    assert result["top1"] == logged["eval_ema/top1"]
    assert f"from the weights file {path}: resize_shorter_crop to 16 px" in lines[-1]
    # A flag overrides one field, and the header says so.
    lines = []
    larger = evaluate.evaluate(path, "sklearn_digits", data_dir=data_dir, size=24,
                               log=lines.append)
    assert larger["preprocessing"]["test_size"] == 24 and larger["overridden"] == {"size": 24}
    assert "to 24 px (set: size)" in lines[-1]
    assert larger["top1"] != result["top1"]


def _test_images(data_dir, count):
    source = sources.open_source("sklearn_digits", "test", data_dir)
    return [(source[i]["image"], int(source[i]["label"])) for i in range(count)]


def test_predictions_are_evaluations(run, data_dir):
    """Prediction prepares images exactly as evaluation: the images it ranks right (by name) are
    the evaluated accuracy over the whole test split."""
    workdir, logged = run
    images = _test_images(data_dir, 360)
    results = predict.predict([image for image, _ in images], workdir, top=3, ema=True)
    labels = [label for _, label in images]
    top1 = np.mean([int(top[0][0]) == label for top, label in zip(results, labels)])
    assert top1 == pytest.approx(logged["eval_ema/top1"], abs=1e-12)
    assert top1 > 0.75, top1   # measured 84% after 60 steps (16 px); chance is 10%
    for top in results:
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
        assert 0 < sum(p for _, p in top) <= 1 + 1e-6


def test_predict_names_imagenet_classes_on_a_photo(tmp_path, capsys):
    """Converted-weight shapes (a 1000-class resnet18 file) on scikit-learn's sample photo:
    the names are ImageNet's, the preprocessing the reference's (224 px)."""
    import jax
    import jax.numpy as jnp
    sklearn_datasets = pytest.importorskip("sklearn.datasets")

    photo = pathlib.Path(sklearn_datasets.__file__).parent / "images" / "china.jpg"
    f = nets.transformed("resnet18")
    params, state = jax.jit(f.init, static_argnames="is_training")(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)), is_training=True)
    path = tmp_path / "resnet18.safetensors"
    nets.weights.save(path, params, state, model="resnet18")
    (result,) = predict.main([str(photo), "--weights", str(path), "--top", "5"])
    out = capsys.readouterr().out
    assert "resize_shorter_crop to 224 px, crop fraction 0.875" in out
    names = set(data.imagenet_classes().values())
    assert len(result.top) == 5 and all(name in names for _, name, _ in result.top)
    for _, name, _ in result.top:
        assert f"{name} (" in out


def test_the_imagenet_class_list():
    tfds = pytest.importorskip("tensorflow_datasets")
    classes = data.imagenet_classes()
    wnids = list(classes)
    assert len(wnids) == 1000 and wnids == sorted(wnids)   # TFDS's imagenet2012 label order
    resized = pathlib.Path(tfds.__file__).parent / "image_classification" / (
        "imagenet_resized_labels.txt")
    assert set(wnids) == set(resized.read_text().split())
    assert classes["n01440764"] == "tench, Tinca tinca" and wnids[1] == "n01443537"
    assert classes[wnids[281]] == "tabby, tabby cat"


# Bad input: one line each (exit 2, or 1 with the other images predicted), never a traceback.


def test_images_that_are_not_rgb_are_converted_and_said_once(run, tmp_path, capsys):
    workdir, _ = run
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    rgb = Image.fromarray(pixels)
    paths = {"gray.png": rgb.convert("L"), "cmyk.jpg": rgb.convert("CMYK"),
             "rgba.png": rgb.convert("RGBA"), "rgb.png": rgb}
    for name, image in paths.items():
        image.save(tmp_path / name)
    (tmp_path / "notes.png").write_text("not an image")
    files = [str(tmp_path / name) for name in [*paths, "notes.png"]]
    with pytest.raises(SystemExit) as exit_:
        predict.main([*files, "--weights", str(workdir), "--top", "1"])
    assert exit_.value.code == 1
    out = capsys.readouterr().out.splitlines()
    (converted,) = [line for line in out if line.startswith("converted to RGB:")]
    for name, kind in (("gray.png", "grayscale"), ("cmyk.jpg", "CMYK"),
                       ("rgba.png", "RGBA, transparency composited onto white")):
        assert f"{name} ({kind})" in converted
    assert "rgb.png" not in converted
    (unreadable,) = [line for line in out if "unreadable" in line]
    assert "notes.png: not an image file" in unreadable
    assert sum(line.startswith(str(tmp_path)) for line in out) == 4   # the four predicted


def _one_line_error(main, argv, capsys, code=2):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_weights_of_another_model_and_a_mismatched_dataset_are_one_line(run, data_dir,
                                                                      tmp_path, capsys):
    workdir, _ = run
    err = _one_line_error(evaluate.main, ["--weights", str(workdir), "--model", "resnet50",
                                          "--data_dir", data_dir], capsys)
    assert "holds resnet18 weights, not resnet50" in err
    err = _one_line_error(predict.main, ["x.png", "--weights", str(workdir), "--model",
                                         "mobilenet_v2"], capsys)
    assert "not mobilenet_v2" in err
    # An image folder of 3 classes against the run's 10-class head.
    for name in ("a", "b", "c"):
        (tmp_path / "folder" / "test" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "test" / name / "x.png")
    err = _one_line_error(evaluate.main, ["--weights", str(workdir), "--data", "image_folder",
                                          "--data_dir", str(tmp_path / "folder")], capsys)
    assert "has 3 classes, but the weights' head (resnet18) has 10 outputs" in err
    err = _one_line_error(evaluate.main, ["--weights", str(workdir), "--data", "no_such_set",
                                          "--data_dir", data_dir], capsys)
    assert "'no_such_set' is not prepared" in err
    names = tmp_path / "names.txt"
    names.write_text("one\ntwo\n")
    err = _one_line_error(predict.main, ["x.png", "--weights", str(workdir), "--names",
                                         str(names)], capsys)
    assert "has 2 names; the head has 10 outputs" in err


def test_the_command_runs_over_all_local_devices(run, data_dir, tmp_path):
    """`python -m tools.evaluate` over 2 (fake CPU) devices: the batch is sharded, the numbers
    are the trainer's, and the JSON holds them."""
    from tests.test_train import ROOT, environment

    workdir, logged = run
    env = environment(devices=2)
    out = tmp_path / "result.json"
    command = [sys.executable, "-m", "tools.evaluate", "--weights", str(workdir), "--ema",
               "--data_dir", data_dir, "--out", str(out)]
    result = subprocess.run([*command, "--batch", "6"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in batches of 6 over 2 cpu device(s)" in result.stdout
    assert f"top-1 {100 * logged['eval_ema/top1']:.2f}%" in result.stdout
    saved = json.loads(out.read_text())
    assert saved["top1"] == logged["eval_ema/top1"] and saved["count"] == 360
    assert [c["class"] for c in saved["per_class"]] == list(range(10))
    refused = subprocess.run([*command, "--batch", "5"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "batch size (5) must be a positive multiple of the 2 local devices" in refused.stderr


def test_class_names_come_from_the_names_file_the_weights_the_runs_data_or_imagenet(tmp_path):
    from training.weight_sources import Source

    for name in ("cat", "dog"):
        (tmp_path / "folder" / "train" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "folder" / "train" / name / "x.png")
    run = Source("resnet18", 2, {}, {}, {}, "a run",
                 dataset={"name": "image_folder", "data_dir": str(tmp_path / "folder")})
    assert evaluate.class_names(run) == ["cat", "dog"]   # the image folder's directories
    assert evaluate.class_names(run._replace(class_names=("a", "b"))) == ["a", "b"]
    names = tmp_path / "names.txt"
    names.write_text("first\n\nsecond\n")
    assert evaluate.class_names(run, str(names)) == ["first", "second"]
    moved = run._replace(dataset={"name": "image_folder", "data_dir": str(tmp_path / "gone")})
    assert evaluate.class_names(moved) == ["class 0", "class 1"]
    imagenet = Source("resnet18", 1000, {}, {}, {}, "a reference file")
    assert evaluate.class_names(imagenet)[:2] == ["tench, Tinca tinca",
                                                   "goldfish, Carassius auratus"]
