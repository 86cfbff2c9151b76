"""train.py training a detector (config.task = "detection") end to end on the built-in detection
dataset, with a reduced EfficientDet-D0: an exact resume after SIGTERM, the COCO evaluation,
images without objects, config and data errors; and the loss normaliser of the global batch.

The runs share one compiled model: the same config (but the dataset) in every run, and JAX's
persistent compilation cache of tests/test_train.py, so only the first run compiles."""

import json
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests.test_train import ROOT, environment, saved_state, train_losses

STEPS = 6
# EfficientDet-D0's architecture shrunk to compile in a minute: its options, not another model.
SMALL = dict(backbone=(0.25, 0.25), fpn_width=16, fpn_cells=1, head_repeats=1)
CONFIG = f'''
import ml_collections
from experiments import efficientdet_d0


def get_config(arg=None):
    config = efficientdet_d0.get_config("local")
    config.model_kwargs = ml_collections.ConfigDict({SMALL!r})
    return config
'''
ARGS = [f"--config.num_steps={STEPS}", "--config.batch_size=4", "--config.log_every=1",
        "--config.checkpoint_every=2", "--config.data.train_size=64",
        "--config.data.test_size=64"]
COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "ARmax1", "ARmax10", "ARmax100",
                "ARs", "ARm", "ARl")

# Runs train.py as __main__; with a step k > 0 (argv[1]) the train data sends the process
# SIGTERM as the loop asks for step k's batch, so the run stops at exactly step k.
PROBE = (
    "import os, runpy, signal, sys\n"
    "from training import detection\n"
    "stop_at, task = int(sys.argv[1]), detection.TASK\n"
    "class Stopping:\n"
    "    def __init__(self, inner):\n"
    "        self.inner, self.reads = inner, 0\n"
    "    def __getattr__(self, name):\n"
    "        return getattr(self.inner, name)\n"
    "    def __next__(self):\n"
    "        self.reads += 1\n"
    "        if self.reads == stop_at:\n"
    "            os.kill(os.getpid(), signal.SIGTERM)\n"
    "        return next(self.inner)\n"
    "detection.TASK = task._replace(\n"
    "    train_data=lambda config, **kw: Stopping(task.train_data(config, **kw)))\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_path('train.py', run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, detection_data_dir):
    """(the built-in detection dataset's data dir, the reduced D0 :local config file)."""
    config = tmp_path_factory.mktemp("detection") / "efficientdet_d0_small.py"
    config.write_text(CONFIG)
    return detection_data_dir, config


def train(setup, workdir, *extra, stop_at=0, check=True):
    data_dir, config = setup
    command = [sys.executable, "-c", PROBE, str(stop_at), "train.py", "--config", str(config),
               *ARGS, f"--config.data.data_dir={data_dir}", f"--workdir={workdir}", *extra]
    # XLA's own depthwise convs compile several times faster than the CPU lowering's
    # shifted multiply-adds, and at 64 px they run as fast.
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env=environment(NETS_CONV_LOWERING="native"), timeout=900)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def records(workdir):
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def straight_run(setup, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train(setup, workdir)


def test_detection_run_reports_coco_metrics_and_losses(straight_run):
    workdir, result = straight_run
    out = result.stdout
    assert "training efficientdet_d0" in out and f"for {STEPS} steps of 4 images" in out
    for step in range(1, STEPS + 1):
        line = next(x for x in out.splitlines() if x.startswith(f"step {step}/{STEPS} |"))
        assert "| cls " in line and "| box " in line and "| positives/image " in line, line
    # The final evaluation: the whole test split (300 canvases), parameters and EMA.
    assert f"eval at step {STEPS} (params, 300 images): AP " in out
    assert f"eval at step {STEPS} (EMA params, 300 images): AP " in out
    assert "test COCO mAP (EMA params): AP " in out
    rows = records(workdir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
    for r in train_rows:
        assert np.isfinite(r["train/loss"]) and r["train/cls_loss"] > 0
        assert r["train/box_loss"] > 0 and r["train/positives"] > 0
    (final,) = [r for r in rows if "eval/AP" in r]
    assert final["step"] == STEPS
    for prefix in ("eval", "eval_ema"):
        for name in COCO_METRICS:
            value = final[f"{prefix}/{name}"]
            assert value == -1 or 0 <= value <= 1, (prefix, name, value)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 4, 6]
    meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert json.loads(meta["config"])["task"] == "detection"


def test_sigterm_checkpoints_and_resume_is_exact(setup, straight_run, tmp_path):
    """Stopped by SIGTERM at step 3 (not a checkpoint step), then run again: the final state
    and every logged loss equal the uninterrupted run's."""
    stopped = train(setup, tmp_path, stop_at=3, check=False)
    assert stopped.returncode == 75, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    assert "SIGTERM: saved the checkpoint at step 3" in stopped.stdout
    assert "test COCO mAP" not in stopped.stdout and "eval at step" not in stopped.stdout
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [2, 3]

    resumed = train(setup, tmp_path)
    assert "resumed from the checkpoint at step 3" in resumed.stdout
    assert "test COCO mAP (EMA params): AP " in resumed.stdout
    straight, _ = straight_run
    for a, b in zip(saved_state(straight, STEPS), saved_state(tmp_path, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)
    assert train_losses(tmp_path) == train_losses(straight)
    final = [r for r in records(tmp_path) if "eval/AP" in r]
    assert final == [r for r in records(straight) if "eval/AP" in r]


# A COCO-format dataset without objects.


def write_coco_json(root, split, objects_per_image, size=(48, 64), seed=0):
    """{root}/annotations/instances_{split}.json and {root}/{split}/{i}.png: one image per entry
    of `objects_per_image`, with that many boxes (categories 1 and 7)."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    height, width = size
    for i, count in enumerate(objects_per_image):
        pixels = rng.integers(0, 40, (height, width, 3)).astype(np.uint8)
        for k in range(count):
            x, y = 4 + 20 * k, 6 + 10 * k
            pixels[y:y + 16, x:x + 12] = 220
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                "bbox": [x, y, 12, 16], "category_id": 1 + 6 * (k % 2),
                                "area": 192, "iscrowd": 0})
        Image.fromarray(pixels).save(root / split / f"{i}.png")
        images.append({"id": i + 1, "height": height, "width": width, "file_name": f"{i}.png"})
    categories = [{"id": 1, "name": "block"}, {"id": 7, "name": "other"}]
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return root


def coco_args(root):
    # 8 train images at batch 4: 2 steps an epoch. The warm-up of 46.875 epochs is the built-in
    # runs' 0.25 epoch of 375 steps (93.75 steps), so the step compiles to the same program and
    # comes from the compilation cache.
    return ["--config.data.name=coco_json", f"--config.data.data_dir={root}",
            "--config.data.train_split=train", "--config.data.eval_split=val",
            "--config.optimizer.warmup_epochs=46.875"]


def test_images_without_objects_train_without_nan(setup, tmp_path):
    """7 of the 8 train images have no objects: every epoch has a batch with no positive anchor
    at all (the loss normaliser is then 1) and a batch that mixes."""
    root = tmp_path / "coco"
    write_coco_json(root, "train", [0, 0, 0, 2, 0, 0, 0, 0])
    write_coco_json(root, "val", [1, 0, 2], seed=1)
    result = train(setup, tmp_path / "run", *coco_args(root))
    rows = [r for r in records(tmp_path / "run") if "train/loss" in r]
    assert len(rows) == STEPS
    for r in rows:
        assert all(np.isfinite(r[k]) for k in ("train/loss", "train/cls_loss",
                                               "train/box_loss", "train/grad_norm")), r
    positives = [r["train/positives"] for r in rows]
    assert min(positives) == 0 and max(positives) > 0, positives
    assert [r["train/box_loss"] for r in rows if r["train/positives"] == 0] == [0.0] * (
        positives.count(0))
    assert f"eval at step {STEPS} (EMA params, 3 images): AP " in result.stdout


# Errors.


def test_a_malformed_instances_json_is_a_one_line_error(setup, tmp_path):
    root = tmp_path / "coco"
    write_coco_json(root, "train", [1, 1, 1, 1])
    write_coco_json(root, "val", [1])
    path = root / "annotations" / "instances_train.json"
    content = json.loads(path.read_text())
    del content["annotations"][2]["bbox"]
    path.write_text(json.dumps(content))
    result = train(setup, tmp_path / "run", *coco_args(root), check=False)
    assert result.returncode in (1, 2), result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert str(path) in errors[0] and "annotation 3 is missing 'bbox'" in errors[0]


def small_config(data_dir, **changes):
    from experiments import efficientdet_d0

    config = efficientdet_d0.get_config("local")
    config.model_kwargs = ml_collections.ConfigDict(SMALL)
    config.data.data_dir = str(data_dir)
    config.update(changes)
    return config


def test_detection_of_a_classifier_is_a_config_error(tmp_path):
    from training import loop

    config = small_config(tmp_path / "nothing_here", model="resnet18")
    config.model_kwargs = ml_collections.ConfigDict()
    with pytest.raises(loop.ConfigError, match=r"config.task='detection' trains detectors "
                                               r"\(efficientdet_d0, .*\); resnet18 is a "
                                               r"classification model"):
        loop.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unknown_nms_and_iou_loss_and_device_augmentation_are_config_errors(tmp_path):
    from training import loop

    config = small_config(tmp_path / "nothing_here")
    config.detection.nms = "soft"
    config.detection.iou_loss_type = "l1"
    config.data.augment_on_device = True   # the classification pipeline's
    with pytest.raises(loop.ConfigError) as error:
        loop.run(config, str(tmp_path / "run"))
    lines = str(error.value).splitlines()
    assert "config.detection.nms='soft': expected one of gaussian, hard" in lines
    assert ("config.detection.iou_loss_type='l1': expected one of '', 'iou', 'giou', 'diou', "
            "'ciou'") in lines
    assert any(line.startswith("config.data.augment_on_device=True: the detection pipeline")
               for line in lines)


# The loss normaliser: positives of the global batch + 1, whatever the devices.

NORMALISER_CHECK = r'''
import json
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import detection
from experiments import efficientdet_d0
from training import detection as task, distributed, loop, steps

config = efficientdet_d0.get_config("local")
config.data.train_size = config.data.test_size = SIZE = 64
CLASSES, ANCHORS = 3, 9
LEVELS = detection.feature_sizes(SIZE, 3, 7)


def forward(images, is_training):
    """Per-level class and box maps of D0's anchor layout from a 1x1 conv of pooled pixels."""
    out = {"class": [], "box": []}
    for i, (h, w) in enumerate(LEVELS):
        b = images.shape[0]
        x = images.reshape(b, h, SIZE // h, w, SIZE // w, 3).mean((2, 4))
        out["class"].append(hk.Conv2D(ANCHORS * CLASSES, 1, name=f"class_{i}")(x))
        out["box"].append(hk.Conv2D(ANCHORS * 4, 1, name=f"box_{i}")(x))
    return out


model = hk.transform_with_state(forward)
loss = task.objective(model, task.anchors(config.model, SIZE), CLASSES, config.detection,
                      dtype=jnp.float32)
rng = np.random.default_rng(0)
boxes = np.zeros((4, 4, 4), np.float32)
labels = np.full((4, 4), -1, np.int32)
# Images 0 and 1 (the first device's half) hold every object; 2 and 3 none.
boxes[0, :3] = [[4, 4, 30, 20], [30, 30, 60, 62], [10, 40, 26, 56]]
labels[0, :3] = [1, 2, 3]
boxes[1, :1] = [[8, 12, 40, 44]]
labels[1, :1] = [2]
batch = {"images": rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32), "boxes": boxes,
         "labels": labels}


def train(devices):
    mesh = Mesh(np.asarray(devices), (distributed.DATA_AXIS,))
    state, optimizer = loop.init_state(config, model, lambda p: optax.sgd(0.1), mesh)
    step = steps.train_step(loss, optimizer, lambda s: 0.1, ema_decay=0.0, mesh=mesh)
    sharded = distributed.global_batch(batch, distributed.batch_sharded(mesh))
    params = jax.device_get(state.params)   # the step donates the state
    state, metrics = step(state, sharded)
    return params, jax.device_get(state.params), float(metrics["loss"]), float(
        metrics["positives"])


params, one, loss_one, positives = train(jax.devices()[:1])
_, two, loss_two, _ = train(jax.devices()[:2])
# Each image alone: its loss times its own normaliser is its unnormalised sum.
single = jax.jit(lambda p, b: loss(p, {}, None, b)[0])
alone = []
for i in range(4):
    row = {k: v[i:i + 1] for k, v in batch.items()}
    targets = detection.assign_targets_batch(task.anchors(config.model, SIZE), row["boxes"],
                                             row["labels"])
    count = float(targets.num_positives[0])
    alone.append((float(single(params, row)), count))
total_positives = sum(c for _, c in alone)
print(json.dumps({
    "loss_one": loss_one, "loss_two": loss_two, "positives_per_image": positives,
    "expected": sum(l * (c + 1) for l, c in alone) / (total_positives + 1),
    "per_image_mean": float(np.mean([l for l, _ in alone])),
    "positives": [c for _, c in alone],
    "params": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one),
                                                              jax.tree.leaves(two))),
}))
'''


def test_the_loss_normaliser_is_the_global_batch_positives_plus_one():
    """The objective in the sharded step: on 2 devices, one holding every object, the loss is
    the one-device loss, and both are the images' unnormalised sums over (all positives + 1)
    (per-image or per-device normalisers would differ by far)."""
    result = subprocess.run(
        [sys.executable, "-c", NORMALISER_CHECK], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env=environment(devices=2))
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    counts = found["positives"]
    assert counts[0] > 0 and counts[1] > 0 and counts[2] == counts[3] == 0, counts
    assert found["positives_per_image"] == pytest.approx(sum(counts) / 4)
    assert found["loss_one"] == pytest.approx(found["expected"], rel=1e-5)
    assert found["loss_two"] == pytest.approx(found["loss_one"], rel=1e-6)
    assert found["params"] < 1e-6, found
    assert abs(found["per_image_mean"] - found["expected"]) > 0.1 * found["expected"]
