"""nets.weights (safetensors files of our trees) and tools.convert (reference weights -> those
files): exact round trips, metadata, the strict / non-strict errors, and each converter path.
Trees are random arrays of the shapes jax.eval_shape gives; nothing is compiled."""

import pickle

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import nets
from nets.registry import module_path
from nets import weights
from tests import reference
from tests.helpers import random_variables
from tools import convert as convert_tool


def _random_trees(name, num_classes=1000, seed=1, **overrides):
    f = nets.transformed(name, num_classes, **overrides)
    return random_variables(f, nets.introspect.example_images(name, **overrides), seed=seed)


@pytest.fixture(scope="module")
def resnet18():
    return _random_trees("resnet18")


def _same_trees(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _rewrite(path, edit):
    """Applies `edit` to the file's {name: array} dict, keeping its metadata."""
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def test_round_trip_is_exact_and_keeps_the_metadata(resnet18, tmp_path):
    params, state = resnet18
    path = tmp_path / "r18.safetensors"
    weights.save(path, params, state, model="resnet18", overrides={"stochastic_depth_rate": 0.1},
                 metadata={"recipe": "experiments/resnet.py:local", "top1": 0.5})
    loaded = weights.load(path)
    _same_trees(loaded, (params, state))
    expected = nets.introspect.shapes("resnet18", stochastic_depth_rate=0.1)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), loaded) == jax.tree.map(
        lambda s: (s.shape, s.dtype), expected)
    with safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
    assert "params/resnet/layer1_0/conv1/w" in keys and "state/resnet/bn1/var" in keys
    assert len(keys) == len(jax.tree.leaves((params, state)))
    meta = weights.read_metadata(path)
    info = nets.model_info("resnet18")
    assert (meta["model"], meta["num_classes"], meta["overrides"]) == (
        "resnet18", 1000, {"stochastic_depth_rate": 0.1})
    assert (meta["recipe"], meta["top1"], meta["reference"]) == (
        "experiments/resnet.py:local", "0.5", info.reference)
    assert meta["preprocessing"]["test_size"] == info.test_size
    assert tuple(meta["preprocessing"]["mean"]) == info.preprocessing.mean


def test_bfloat16_trees_are_stored_as_float32(resnet18, tmp_path):
    params, state = resnet18
    half = jax.tree.map(lambda v: np.asarray(v).astype(jax.numpy.bfloat16), params)
    weights.save(tmp_path / "bf16.safetensors", half, state, model="resnet18")
    loaded, _ = weights.load(tmp_path / "bf16.safetensors")
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {np.dtype(np.float32)}
    _same_trees(loaded, jax.tree.map(lambda v: np.asarray(v, np.float32), half))


def test_strict_load_lists_missing_unexpected_and_mismatched_names(resnet18, tmp_path):
    path = tmp_path / "r18.safetensors"
    weights.save(path, *resnet18, model="resnet18")

    def edit(tensors):
        del tensors["params/resnet/layer2_0/conv2/w"]
        tensors["params/resnet/layer9/conv/w"] = np.zeros((3,), np.float32)
        tensors["state/resnet/bn1/mean"] = np.zeros((65,), np.float32)

    _rewrite(path, edit)
    with pytest.raises(ValueError) as error:
        weights.load(path)
    message = str(error.value)
    assert "does not fit resnet18 (num_classes=1000)" in message
    assert "missing (1): params/resnet/layer2_0/conv2/w" in message
    assert "unexpected (1): params/resnet/layer9/conv/w" in message
    assert "shape mismatch (1): state/resnet/bn1/mean: file (65,) vs model (64,)" in message
    # Non-strict mode tolerates the first two but not the shape mismatch, like torch.
    with pytest.raises(ValueError, match=r"shape mismatch \(1\)") as error:
        weights.load(path, strict=False)
    assert "missing (" not in str(error.value) and "unexpected (" not in str(error.value)


def test_a_new_head_is_a_mismatch_unless_dropped_then_non_strict_reports_it(resnet18, tmp_path):
    path = tmp_path / "r18.safetensors"
    weights.save(path, *resnet18, model="resnet18")
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"not resnet18 \(num_classes=10\)(?s:.*)shape "
                                             r"mismatch \(2\): params/resnet/fc/b"):
            weights.load(path, num_classes=10, strict=strict)

    _rewrite(path, lambda t: [t.pop(k) for k in ("params/resnet/fc/w", "params/resnet/fc/b")])
    with pytest.raises(ValueError, match=r"missing \(2\)"):
        weights.load(path, num_classes=10)
    found = weights.load(path, num_classes=10, strict=False)
    assert found.missing == ["params/resnet/fc/b", "params/resnet/fc/w"]
    assert found.unexpected == []
    params, state = resnet18
    _same_trees(found.params, {m: v for m, v in params.items() if m != "resnet/fc"})
    _same_trees(found.state, state)


def test_another_models_file_is_refused_naming_both(resnet18, tmp_path):
    path = tmp_path / "r18.safetensors"
    weights.save(path, *resnet18, model="resnet18")
    with pytest.raises(ValueError) as error:
        weights.load(path, "resnet50")
    message = str(error.value)
    assert "holds resnet18 (num_classes=1000), not resnet50 (num_classes=1000)" in message
    assert "missing" in message and "params/resnet/layer1_0/conv3/w" in message
    assert "shape mismatch" in message and "params/resnet/layer1_0/conv1/w" in message
    assert "unexpected" not in message  # resnet18's names are all resnet50's too
    # save checks the trees against the model too, and writes nothing when they do not fit.
    with pytest.raises(ValueError, match="not resnet50's .* nothing was written"):
        weights.save(tmp_path / "wrong.safetensors", *resnet18, model="resnet50")
    assert not (tmp_path / "wrong.safetensors").exists()


def test_files_not_written_by_save_are_refused(tmp_path):
    save_file({"conv1.weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "torch.safetensors"))
    with pytest.raises(ValueError, match="not written by nets.weights.save.*tools.convert"):
        weights.load(tmp_path / "torch.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        weights.load(tmp_path / "absent.safetensors")


def test_convert_torch_state_dicts_to_files_that_load_like_from_torch(tmp_path, capsys):
    torch = reference.torch()
    model = reference.torchvision().models.resnet18(num_classes=7)
    reference.randomize_batchnorm(model)
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    expected = nets.convert.from_torch("resnet18", model.state_dict())
    summary = convert_tool.main(["--from", "torch", str(tmp_path / "r18.pth"), "--model",
                                 "resnet18", "--out", str(tmp_path / "r18.safetensors")])
    assert "wrote" in capsys.readouterr().out
    assert (summary["num_classes"], summary["parameters"]) == (
        7, sum(p.numel() for p in model.parameters()))
    _same_trees(weights.load(tmp_path / "r18.safetensors"), expected)
    assert weights.read_metadata(tmp_path / "r18.safetensors")["source"] == "torch:r18.pth"

    # A torch state dict in safetensors (the format hubs publish) reads without unpickling.
    from safetensors.torch import save_file as save_torch

    save_torch(model.state_dict(), str(tmp_path / "r18_torch.safetensors"))
    convert_tool.main(["--from", "torch", str(tmp_path / "r18_torch.safetensors"), "--model",
                       "resnet18", "--out", str(tmp_path / "r18b.safetensors")])
    _same_trees(weights.load(tmp_path / "r18b.safetensors"), expected)


# Keras' weight order within a layer: Conv2D / Dense [kernel, bias], BatchNormalization
# [gamma, beta, moving_mean, moving_variance].
_KERAS_ORDER = {"w": 0, "b": 1, "scale": 0, "offset": 1, "mean": 2, "var": 3}


def test_convert_keras_notop_file_records_the_pre_logits_option(tmp_path):
    """A legacy .h5 in the layout keras.applications downloads (layer_names at the root), written
    from random trees under the registry's Keras layer names (building the Keras model takes
    ~30 s here; tests/test_keras_reference.py checks the names and files against Keras itself)."""
    h5py = pytest.importorskip("h5py")
    name, overrides = "keras_mobilenet_v3_small", {"pre_logits": False}
    params, state = _random_trees(name, 0, **overrides)
    info = nets.model_info(name)
    layers = {}
    for tree in (params, state):
        for module, leaves in tree.items():
            layer = info.keras_name(module_path(module), {**info.config, **overrides})
            for leaf, value in leaves.items():
                layers.setdefault(layer, {})[_KERAS_ORDER[leaf]] = value
    with h5py.File(tmp_path / "notop.h5", "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in layers]
        for layer, arrays in layers.items():
            names = [f"{layer}/{i}:0" for i in sorted(arrays)]
            f.create_group(layer).attrs["weight_names"] = [n.encode() for n in names]
            for i, n in zip(sorted(arrays), names):
                f[layer][n] = arrays[i]
    summary = convert_tool.main(["--from", "keras", str(tmp_path / "notop.h5"), "--model",
                                 name, "--out", str(tmp_path / "k.safetensors")])
    assert (summary["num_classes"], summary["overrides"]) == (0, overrides)
    _same_trees(weights.load(tmp_path / "k.safetensors"), (params, state))


def test_convert_nfnet_refuses_pickles_and_reads_flat_npz(tmp_path):
    with open(tmp_path / "F0_haiku.npz", "wb") as f:
        pickle.dump({"NFNet/~/stem_conv0": {"w": np.zeros(2)}}, f)
    with pytest.raises(ValueError, match="(?s)is a pickle.*dill.load.*flat.npz"):
        convert_tool.main(["--from", "nfnet", str(tmp_path / "F0_haiku.npz"), "--model",
                           "nfnet_f0", "--out", str(tmp_path / "f0.safetensors")])
    # A flat archive is read (its names reach the converter, which lists what does not fit).
    np.savez(tmp_path / "flat.npz", **{"NFNet/~/bogus/w": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"official NFNet checkpoint into nfnet_f0(?s:.*)"
                                         r"unexpected \(1\): NFNet/bogus/w"):
        convert_tool.main(["--from", "nfnet", str(tmp_path / "flat.npz"), "--model",
                           "nfnet_f0", "--out", str(tmp_path / "f0.safetensors")])
    assert not (tmp_path / "f0.safetensors").exists()


def test_training_checkpoints_export_their_params_or_ema(resnet18, tmp_path):
    pytest.importorskip("orbax.checkpoint")
    from training.checkpoint import Checkpoints
    from training.state import TrainState

    params, state = resnet18
    ema_params, ema_state = _random_trees("resnet18", 10, seed=2)
    params, state = _random_trees("resnet18", 10, seed=3)
    signature = {"model": "resnet18", "model_kwargs": {"stochastic_depth_rate": 0.1},
                 "num_classes": 10, "param_shapes": {}}
    from experiments import common

    config = common.base()
    config.data.update(dict(name="sklearn_digits", num_classes=10, test_size=48,
                            crop_fraction=0.75))
    ckpt = Checkpoints(str(tmp_path / "run" / "checkpoints"), 2, signature, config.to_json())
    train_state = TrainState(np.int32(7), np.zeros(2, np.uint32), params, state, (),
                             ema_params, ema_state)
    ckpt.save(7, train_state, {"position": 0})
    ckpt.wait()
    ckpt.close()

    from training.checkpoint import read_weights, run_model

    run = read_weights(tmp_path / "run")
    assert run.model == "resnet18"
    _same_trees((run.params, run.state), (params, state))
    assert run_model(tmp_path / "run" / "checkpoints" / "7") == {
        "model": "resnet18", "num_classes": 10, "overrides": {"stochastic_depth_rate": 0.1},
        "step": 7}
    convert_tool.main(["--from", "checkpoint", str(tmp_path / "run"), "--ema",
                       "--out", str(tmp_path / "ema.safetensors")])
    _same_trees(weights.load(tmp_path / "ema.safetensors"), (ema_params, ema_state))
    meta = weights.read_metadata(tmp_path / "ema.safetensors")
    assert meta["overrides"] == {"stochastic_depth_rate": 0.1}
    # The run's eval preprocessing travels on, not the registry's (224 px, 0.875).
    assert meta["eval_preprocessing"] == {k: config.data[k] if k not in ("mean", "std")
                                          else list(config.data[k])
                                          for k in weights.EVAL_PREPROCESSING_FIELDS}
