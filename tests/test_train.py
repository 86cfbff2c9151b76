"""train.py end to end on the built-in dataset: a run, exact resume after SIGTERM and after a hard
kill, two processes against one, a non-finite loss, a checkpoint from another model, and the
1-device vs 4-device step."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import data
from tests.helpers import TEST_XLA_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 12
# At 16 px (the :local default is 32) a train.py run is mostly its fixed costs: these tests are
# about the program, not the resolution.
ARGS = ["--config", "experiments/resnet18.py:local", f"--config.num_steps={STEPS}",
        "--config.batch_size=16", "--config.log_every=1", "--config.checkpoint_every=4",
        "--config.data.train_size=16", "--config.data.test_size=16"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    data.prepare_builtin(str(path))
    return path


def train_command(workdir, data_dir, *extra):
    return [sys.executable, "train.py", *ARGS, f"--config.data.data_dir={data_dir}",
            f"--workdir={workdir}", *extra]


# The train.py runs of this process compile the same steps again and again: JAX's persistent
# compilation cache (one directory per test process) compiles each once.
COMPILATION_CACHE = tempfile.mkdtemp(prefix="jax-compilation-cache-")


def environment(devices: int = 0, **extra):
    """The environment of a program a test starts; `devices` > 0 fakes that many CPU devices."""
    xla_flags = TEST_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}"
                                  if devices else "")
    return {**os.environ, "XLA_FLAGS": xla_flags, "PYTHONUNBUFFERED": "1",
            "JAX_COMPILATION_CACHE_DIR": COMPILATION_CACHE, **extra}


def run_train(workdir, data_dir, *extra, check=True):
    result = subprocess.run(train_command(workdir, data_dir, *extra), cwd=ROOT,
                            capture_output=True, text=True, env=environment(), timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def saved_tree(workdir, step):
    """The train state saved at `step` as {"params/resnet/conv1/w": array, ...}, in tree order,
    restored onto this process's one device whatever topology wrote it."""
    path = pathlib.Path(workdir, "checkpoints", str(step), "state").resolve()
    checkpointer = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          checkpointer.metadata(path).item_metadata.tree)
    restored = checkpointer.restore(path, target)
    return {"/".join(str(getattr(k, "key", k)) for k in keys): np.asarray(leaf)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}


def saved_state(workdir, step):
    """Every array of the train state saved at `step`, as numpy arrays in tree order."""
    return list(saved_tree(workdir, step).values())


def wait_for(predicate, process, timeout=300):
    start = time.time()
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout
        time.sleep(0.2)


def train_losses(workdir):
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if '"train/loss"' in line]


def logged_steps(workdir):
    path = pathlib.Path(workdir, "metrics.jsonl")
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if '"train/loss"' in line]


# Runs train.py as __main__ and says, as the interpreter exits, whether TensorFlow and torch
# were imported.
IMPORT_PROBE = (
    "import atexit, runpy, sys\n"
    "atexit.register(lambda: print('imported:', 'tensorflow' in sys.modules, 'torch' in "
    "sys.modules))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path('train.py', run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("straight")
    command = [sys.executable, "-c", IMPORT_PROBE, *train_command(workdir, data_dir)[1:]]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env=environment(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result


def test_train_py_end_to_end(straight_run):
    workdir, result = straight_run
    assert "test accuracy (EMA params): top-1" in result.stdout
    assert f"step {STEPS}/{STEPS} | epoch" in result.stdout and "img/s | ETA" in result.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, STEPS + 1))
    final = [r for r in records if "eval/top1" in r]
    assert len(final) == 1 and {"eval/top5", "eval/loss", "eval_ema/top1"} <= final[0].keys()
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "12", "4", "8"]
    assert any((workdir / "tensorboard").iterdir())
    meta = json.loads((workdir / "checkpoints" / "12" / "meta" / "metadata").read_text())
    assert meta["signature"]["model"] == "resnet18"
    # The preprocessing travels with the weights.
    recorded = json.loads(meta["config"])["data"]
    assert recorded["eval_preprocess"] == "resize_shorter_crop"
    assert recorded["image_ops"] == "torchvision" and recorded["interpolation"] == "bilinear"


def test_training_never_imports_tensorflow_or_torch(straight_run):
    # Both installed (the test extra has them), yet neither imported: seconds of every start.
    pytest.importorskip("tensorflow")
    pytest.importorskip("torch")
    _, result = straight_run
    assert result.stdout.splitlines()[-1] == "imported: False False"


# The README's default run, shortened: 40 steps of 32 (under one epoch) at lr 0.1 from the start,
# no EMA, at 16 px. Measured 70.6% test top-1; chance is 10%.
LEARNING_THRESHOLD = 0.5


def test_a_short_run_learns_the_builtin_dataset(data_dir, tmp_path):
    run_train(tmp_path, data_dir, "--config.num_steps=40", "--config.batch_size=32",
              "--config.optimizer.base_lr=0.8", "--config.optimizer.warmup_epochs=0",
              "--config.ema_decay=0", "--config.checkpoint_every=40", "--config.log_every=10")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < 0.75 * losses[0], losses
    (final,) = [r for r in records if "eval/top1" in r]
    assert final["eval/top1"] > LEARNING_THRESHOLD, final


def test_augmenting_in_the_step_trains_as_augmenting_on_the_host(data_dir, tmp_path):
    """NFNet's batch augmentation (MixUp and CutMix on alternate rows, RandAugment on the mix)
    in the numpy pipeline and, with data.augment_on_device, inside the jitted step: the same
    images (tests/test_device_augment.py), so the same run."""
    augment = ["--config.num_steps=3", "--config.checkpoint_every=3", "--config.seed=2",
               "--config.data.mixup_alpha=0.2", "--config.data.cutmix=True",
               "--config.data.randaugment_layers=2", "--config.data.randaugment_magnitude=10"]
    run_train(tmp_path / "host", data_dir, *augment)
    run_train(tmp_path / "device", data_dir, *augment, "--config.data.augment_on_device=True")
    host, device = (train_losses(tmp_path / run) for run in ("host", "device"))
    assert len(host) == 3
    assert device == host


def test_rerun_resumes_a_finished_run(straight_run, data_dir):
    workdir, _ = straight_run
    result = run_train(workdir, data_dir)
    assert f"resumed from the checkpoint at step {STEPS}" in result.stdout
    assert "test accuracy" in result.stdout


def test_sigterm_checkpoints_and_resume_is_exact(straight_run, data_dir, tmp_path):
    process = subprocess.Popen(train_command(tmp_path, data_dir), cwd=ROOT, env=environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(logged_steps(tmp_path)) >= 2, process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    # Not 0: job runners and retry wrappers must not take a preempted run for a finished one.
    assert process.returncode == 75, out + err
    assert "SIGTERM: saved the checkpoint at step" in out
    stopped = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 <= stopped < STEPS and "test accuracy" not in out

    resumed = run_train(tmp_path, data_dir)
    assert f"resumed from the checkpoint at step {stopped}" in resumed.stdout
    straight, _ = straight_run
    for a, b in zip(saved_state(straight, STEPS), saved_state(tmp_path, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_during_the_final_evaluation_stops_it_and_a_rerun_evaluates(
        data_dir, tmp_path, monkeypatch):
    """SIGTERM arriving while the last evaluation runs (here sent by the eval data itself, so
    the timing is exact) ends the run as preempted without a result; the last step's checkpoint
    is there, and running again evaluates it."""
    from experiments import resnet18
    from training import classification, loop

    task = classification.TASK
    batches_read = []

    def eval_data(config, **kwargs):
        for batch in task.eval_data(config, **kwargs):
            batches_read.append(1)
            if len(batches_read) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    config = resnet18.get_config("local")
    config.update(dict(model="mobilenet_v1_025", num_steps=2, log_every=1, ema_decay=0.0))
    config.model_kwargs = {}   # ResNet-18's options; a small MobileNet compiles fast
    config.data.data_dir = str(data_dir)
    monkeypatch.setattr(classification, "TASK", task._replace(eval_data=eval_data))
    stopped = loop.run(config, str(tmp_path))
    assert stopped.preempted and stopped.evaluation is None and stopped.step == 2
    assert len(batches_read) == 1   # of 3: the loop stops at the next check
    monkeypatch.setattr(classification, "TASK", task)
    finished = loop.run(config, str(tmp_path))
    assert not finished.preempted and finished.evaluation.params["top1"] >= 0


def test_hard_kill_after_a_checkpoint_resumes_exactly(straight_run, data_dir, tmp_path):
    process = subprocess.Popen(train_command(tmp_path, data_dir), cwd=ROOT, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (tmp_path / "checkpoints" / "4").exists(), process)
    process.kill()
    process.wait()
    resumed = run_train(tmp_path, data_dir)
    assert "resumed from the checkpoint at step" in resumed.stdout
    straight, _ = straight_run
    for a, b in zip(saved_state(straight, STEPS), saved_state(tmp_path, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)


def copy_of(workdir, tmp_path):
    """A copy of a run's workdir to break things in."""
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy


def test_unreadable_checkpoints_are_set_aside_and_logs_stay_single_valued(straight_run,
                                                                          data_dir, tmp_path):
    """Reproduces a kill mid-save and a damaged disk: the newest checkpoint's array data
    truncated, the one before with an empty metadata file, an interrupted save's temporary
    directory left over, and metrics.jsonl holding the steps after the last good checkpoint.
    The run resumes from the newest checkpoint that reads (step 4), says which it skipped and
    why, logs every step once and ends where the uninterrupted run did."""
    workdir = copy_of(straight_run[0], tmp_path)
    checkpoints = workdir / "checkpoints"
    for data_file in (checkpoints / "12" / "state").rglob("*"):
        if data_file.is_file() and data_file.stat().st_size > 1000:
            data_file.write_bytes(data_file.read_bytes()[:100])
    (checkpoints / "8" / "meta" / "metadata").write_text("")
    (checkpoints / "10.orbax-checkpoint-tmp-1234").mkdir()
    result = run_train(workdir, data_dir)
    assert "set aside an unreadable checkpoint: step 12 (" in result.stdout
    assert "set aside an unreadable checkpoint: step 8 (" in result.stdout
    assert f"resumed from the checkpoint at step 4 in {checkpoints}" in result.stdout
    assert logged_steps(workdir) == list(range(1, STEPS + 1))
    assert not list(checkpoints.glob("*tmp*"))
    assert len(list(checkpoints.glob("12.unreadable-*"))) == 1   # set aside, not deleted
    for a, b in zip(saved_state(straight_run[0], STEPS), saved_state(workdir, STEPS),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_readable_checkpoint_is_one_error_naming_the_directory(straight_run, data_dir,
                                                                  tmp_path):
    workdir = copy_of(straight_run[0], tmp_path)
    for metadata in (workdir / "checkpoints").glob("*/meta/metadata"):
        metadata.write_text("")
    result = run_train(workdir, data_dir, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"no checkpoint in {workdir / 'checkpoints'} reads (step 12 (" in result.stderr


def test_resuming_with_a_config_that_changes_the_run_is_refused(straight_run, data_dir,
                                                               tmp_path):
    """Reproduces a rerun of a finished workdir with another learning rate, MixUp, label
    smoothing and a longer schedule: refused before anything is built, listing each change,
    unless config.resume_with_changes; harmless changes (log and checkpoint frequencies) are
    only logged."""
    workdir = copy_of(straight_run[0], tmp_path)
    changed = ("--config.optimizer.base_lr=0.2", "--config.data.mixup_alpha=0.2",
               "--config.label_smoothing=0.1", f"--config.num_steps={STEPS + 4}")
    refused = run_train(workdir, data_dir, *changed, "--config.log_every=3", check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    for line in ("optimizer.base_lr: 0.4 -> 0.2", "data.mixup_alpha: 0.0 -> 0.2",
                 "label_smoothing: 0.0 -> 0.1", f"num_steps: {STEPS} -> {STEPS + 4}"):
        assert line in refused.stderr
    assert "log_every" not in refused.stderr and "resume_with_changes=True" in refused.stderr
    assert "test accuracy" not in refused.stdout

    harmless = run_train(workdir, data_dir, "--config.log_every=3",
                         "--config.checkpoint_every=6")
    assert ("config changes since the checkpoint (harmless): checkpoint_every: 4 -> 6; "
            "log_every: 1 -> 3") in harmless.stdout

    forced = run_train(workdir, data_dir, *changed, "--config.resume_with_changes=True")
    assert "resuming with config changes (config.resume_with_changes): " in forced.stdout
    assert "optimizer.base_lr: 0.4 -> 0.2" in forced.stdout
    assert f"resumed from the checkpoint at step {STEPS}" in forced.stdout
    assert logged_steps(workdir)[-4:] == list(range(STEPS + 1, STEPS + 5))


def test_keep_every_steps_keeps_milestones_besides_the_newest(data_dir, tmp_path):
    run_train(tmp_path, data_dir, "--config.checkpoint_every=2", "--config.keep_checkpoints=1",
              "--config.keep_every_steps=8", "--config.num_steps=10", "--config.log_every=5")
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [8, 10]


def test_default_workdirs_name_the_overrides():
    """Two sweeps' configs without --workdir must not share one directory."""
    probe = ("import sys, train; print(train.default_workdir(sys.argv[1], sys.argv[2:]))")

    def workdir(*overrides):
        result = subprocess.run([sys.executable, "-c", probe, "experiments/resnet18.py:local",
                                 *overrides], cwd=ROOT, capture_output=True, text=True,
                                check=True)
        return result.stdout.strip()

    plain = workdir()
    assert plain == os.path.join("runs", "resnet18-local")
    a = workdir("--config.optimizer.base_lr=0.2", "--config.seed=1")
    assert a.startswith(plain + "-") and a != plain
    assert workdir("--config.seed=1", "--config.optimizer.base_lr=0.2") == a
    assert workdir("--config.seed", "1", "--config.optimizer.base_lr=0.2") == a
    assert workdir("--config.optimizer.base_lr=0.3", "--config.seed=1") != a


def test_an_unreadable_image_names_itself_or_is_skipped_and_counted(tmp_path):
    """Reproduces a truncated JPEG in an image folder: the run stops with one line naming the
    file (not a decoder traceback), or, with data.skip_unreadable, trains on and reports the
    count at the evaluation."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for label in ("a", "b"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(
                    folder / f"{i}.jpg")
    broken = tmp_path / "images" / "train" / "b" / "3.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    args = ["--config.data.name=image_folder", f"--config.data.data_dir={tmp_path / 'images'}",
            "--config.data.num_classes=2", "--config.batch_size=16", "--config.num_steps=2",
            "--config.eval_batch_size=8", "--config.optimizer.warmup_epochs=0"]
    stopped = run_train(tmp_path / "run1", tmp_path, *args, check=False)
    assert stopped.returncode == 1 and "Traceback" not in stopped.stderr
    assert f"({broken})" in stopped.stderr and "data.skip_unreadable=True" in stopped.stderr
    skipped = run_train(tmp_path / "run2", tmp_path, *args, "--config.data.skip_unreadable=True")
    assert "unreadable training examples replaced so far: 2 (data.skip_unreadable)" in (
        skipped.stdout)


def descendants(pid: int) -> set[int]:
    """The processes started by `pid`, and theirs, from /proc (Linux)."""
    children = {}
    for status in pathlib.Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines()
                          if ":\t" in line)
        except OSError:   # the process ended meanwhile
            continue
        children.setdefault(int(fields["PPid"]), set()).add(int(fields["Pid"]))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_worker_processes_die_with_a_killed_trainer(data_dir, tmp_path):
    """Reproduces kill -9 of a trainer with grain worker processes: its workers and
    multiprocessing's resource tracker used to stay alive (~215 MB each) for minutes."""
    process = subprocess.Popen(train_command(tmp_path, data_dir, "--config.data.workers=2"),
                               cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(lambda: len(logged_steps(tmp_path)) >= 1, process)
    workers = descendants(process.pid)
    assert len(workers) >= 2, workers
    process.kill()
    process.wait()

    def running(pid):
        try:   # a zombie has exited; only its parent's wait is missing
            return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    deadline = time.time() + 30
    while (alive := {p for p in workers if running(p)}) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive, f"still running 30 s after the trainer was killed: {alive}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(straight_run, data_dir, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen(
        train_command(tmp_path, data_dir, f"--coordinator_address={address}",
                      "--num_processes=2", f"--process_id={i}"),
        cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (out, err) in zip(processes, outputs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert "over 2 cpu device(s) in 2 process(es)" in outputs[0][0]
    straight, _ = straight_run
    # The same global batches and the same update up to the order of float32 sums. Early
    # training with BatchNorm on small batches amplifies those roundings from step ~7 on, so
    # the state is compared tightly at the step-4 checkpoint and the losses loosely after.
    for a, b in zip(saved_state(straight, 4), saved_state(tmp_path, 4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    one, two = (train_losses(w) for w in (straight, tmp_path))
    np.testing.assert_allclose(one[:6], two[:6], rtol=1e-6)
    np.testing.assert_allclose(one, two, rtol=1e-2)


def test_non_finite_loss_stops_with_the_step(data_dir, tmp_path):
    result = run_train(tmp_path, data_dir, "--config.optimizer.base_lr=1e30",
                       "--config.optimizer.warmup_epochs=0", check=False)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "at step" in result.stderr and "training stopped" in result.stderr


def test_checkpoint_of_another_model_is_a_clear_error(straight_run, data_dir):
    workdir, _ = straight_run
    result = run_train(workdir, data_dir, "--config.data.num_classes=12", check=False)
    assert result.returncode == 1
    assert "is from resnet18(num_classes=10" in result.stderr
    assert "this config builds resnet18(num_classes=12" in result.stderr


def test_missing_dataset_names_it_and_the_local_variant(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "experiments/nfnet_f1.py",
         f"--config.data.data_dir={tmp_path}", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, env=environment(), timeout=300)
    assert result.returncode == 1
    assert "imagenet2012" in result.stderr and str(tmp_path) in result.stderr
    assert ":local" in result.stderr


def test_unknown_config_field_suggests_the_right_one():
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "experiments/nfnet_f1.py",
         "--config.optimizer.base_lrr=0.2"],
        cwd=ROOT, capture_output=True, text=True, env=environment(), timeout=120)
    assert result.returncode == 2
    assert "unknown config field base_lrr" in result.stderr
    assert 'Did you mean base_lr' in result.stderr and "Traceback" not in result.stderr


def test_one_and_four_devices_give_the_same_update():
    result = subprocess.run(
        [sys.executable, "tests/scripts/device_count_check.py"], cwd=ROOT, capture_output=True,
        text=True, timeout=600,
        env=environment(devices=4))
    assert result.returncode == 0, result.stderr[-3000:]
    diff = json.loads(result.stdout.strip().splitlines()[-1])
    assert diff["param_change"] > 1e-3       # the steps moved the parameters
    for key in ("params", "model_state", "ema_params"):
        assert diff[key] < 2e-6, diff
    assert diff["loss"] < 1e-5, diff


def test_cross_entropy_smooths_after_mixing():
    from training.classification import cross_entropy
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]], np.float32)
    targets = np.array([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]], np.float32)
    smoothed = 0.9 * targets + 0.1 / 3
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(smoothed * log_p).sum(-1).mean()
    assert float(cross_entropy(logits, targets, 0.1)) == pytest.approx(expected, rel=1e-6)


def test_bfloat16_compute_keeps_float32_state():
    import jax.numpy as jnp

    import nets
    from experiments import common
    from training import classification, distributed, loop, optimizers, steps

    config = common.base()
    config.model, config.data.num_classes, config.data.train_size = "resnet18", 10, 32
    config.ema_decay = 0.9
    mesh = distributed.data_mesh()
    model = nets.transformed("resnet18", num_classes=10)
    schedule = optimizers.learning_rate(config.optimizer, 4, 10.0, 10)
    state, optimizer = loop.init_state(
        config, model, lambda p: optimizers.optimizer(config.optimizer, "resnet18", p, schedule),
        mesh)
    loss = classification.objective(model, dtype=jnp.bfloat16, label_smoothing=0.1)
    step = steps.train_step(loss, optimizer, schedule, ema_decay=0.9, mesh=mesh)
    rng = np.random.default_rng(0)
    batch = {"images": rng.normal(size=(4, 32, 32, 3)).astype(np.float32),
             "targets": np.eye(10, dtype=np.float32)[[1, 2, 3, 4]]}
    state, metrics = step(state, distributed.global_batch(batch, distributed.batch_sharded(mesh)))
    assert np.isfinite(float(metrics["loss"])) and metrics["loss"].dtype == jnp.float32
    for tree in (state.params, state.model_state, state.opt_state, state.ema_params):
        assert {x.dtype for x in jax.tree.leaves(tree)} <= {jnp.dtype(jnp.float32),
                                                           jnp.dtype(jnp.int32)}


def test_unknown_model_is_a_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config.model=resnet19", f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, env=environment(), timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "unknown model 'resnet19'. Did you mean: resnet18" in result.stderr


# ----------------------------------------------------------------------------------------------
# Transfer learning (training/transfer.py) end to end, from the finished resnet18 run above
# (distillation from a weights file: tests/test_train_distill.py).


def run_experiment(config, workdir, data_dir, *extra, size=16):
    command = [sys.executable, "train.py", "--config", config, "--config.batch_size=16",
               "--config.log_every=1", f"--config.data.train_size={size}",
               f"--config.data.test_size={size}", f"--config.data.data_dir={data_dir}",
               f"--workdir={workdir}", *extra]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            env=environment(), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_fine_tuning_from_a_workdir_freezes_the_stem_and_stage_1(straight_run, data_dir,
                                                                  tmp_path):
    source, _ = straight_run
    result = run_experiment("experiments/finetune_gcnet_resnet50.py:local", tmp_path, data_dir,
                            "--config.model=resnet18", f"--config.init_from={source}",
                            "--config.reset_head=True", "--config.num_steps=2",
                            "--config.ema_decay=0.9", "--config.seed=1")
    assert (f"init_from resnet18 checkpoint at step {STEPS} in {source}: loaded 100 of 102 "
            "arrays (parameters and BN statistics); the head keeps its fresh init (reset_head)"
            in result.stdout)
    assert ("freeze ('conv1', 'bn1', 'layer1_'): 157,504 parameters frozen (and their BN "
            "statistics), 11,024,138 trainable") in result.stdout
    before, after = saved_tree(source, STEPS), saved_tree(tmp_path, 2)
    frozen = ("/conv1/", "/bn1/", "/layer1_")
    checked = {"frozen": 0, "trained": 0}
    for key, value in after.items():
        field, module = key.split("/")[0], key.split("/", 2)[-1]
        if field not in ("params", "model_state", "ema_params", "ema_model_state"):
            continue
        if ("/" + module).startswith(frozen):
            # The source's (its params and statistics, not its EMA: init_from_ema is off), kept.
            np.testing.assert_array_equal(value, before[key.removeprefix("ema_")], err_msg=key)
            checked["frozen"] += 1
        elif field == "params" and "/fc/" not in key:
            assert np.any(value != before[key]), key   # loaded, then trained
            checked["trained"] += 1
    # 15 frozen parameter leaves and 10 BN statistics, each with its EMA (which starts from the
    # loaded values); 62 parameter leaves in all.
    assert checked == {"frozen": 2 * (15 + 10), "trained": 62 - 15 - 2}
    # The head is a fresh init (reset_head; another seed than the source's), not the source's.
    assert not np.allclose(after["params/resnet/fc/w"], before["params/resnet/fc/w"], atol=1e-2)

    # Resuming always wins over init_from.
    again = run_experiment("experiments/finetune_gcnet_resnet50.py:local", tmp_path, data_dir,
                           "--config.model=resnet18", f"--config.init_from={source}",
                           "--config.num_steps=2", "--config.ema_decay=0.9", "--config.seed=1")
    assert "resumed from the checkpoint at step 2" in again.stdout
    assert "(config.init_from is for fresh runs only)" in again.stdout
    assert "init_from resnet18" not in again.stdout
