"""training.weight_sources.read, the one reader of weights: a PyTorch state dict in any of the
containers training scripts save, a nets.weights file, and clear errors otherwise. (Training
runs as sources: tests/test_transfer.py, test_train.py and test_weights.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nets
from tests import reference
from tests.helpers import random_variables
from training import weight_sources


@pytest.fixture(scope="module")
def resnet18_state_dict():
    """A random torchvision resnet18 state dict with a 10-class head, as numpy arrays."""
    torch = reference.torch()
    model = reference.torchvision().models.resnet18(num_classes=10)
    reference.randomize_batchnorm(model)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}, torch


@pytest.mark.parametrize("container", ["plain", "state_dict", "model"])
def test_pytorch_state_dicts_are_read_from_any_container(resnet18_state_dict, tmp_path,
                                                         container):
    state_dict, torch = resnet18_state_dict
    tensors = {k: torch.from_numpy(v) for k, v in state_dict.items()}
    saved = tensors if container == "plain" else {container: tensors, "epoch": 3}
    torch.save(saved, tmp_path / "r18.pth")
    source = weight_sources.read(tmp_path / "r18.pth", model="resnet18")
    expected = nets.convert.from_torch("resnet18", state_dict)
    assert (source.model, source.num_classes, source.overrides) == ("resnet18", 10, {})
    jax.tree.map(np.testing.assert_array_equal, (source.params, source.state), expected)


def test_a_pytorch_safetensors_file_is_a_state_dict_and_needs_its_model(resnet18_state_dict,
                                                                       tmp_path):
    from safetensors.numpy import save_file

    state_dict, _ = resnet18_state_dict
    save_file(state_dict, tmp_path / "r18.safetensors")
    source = weight_sources.read(tmp_path / "r18.safetensors", model="resnet18")
    np.testing.assert_array_equal(source.params["resnet/fc"]["w"], state_dict["fc.weight"].T)
    with pytest.raises(ValueError, match="needs the model it is for"):
        weight_sources.read(tmp_path / "r18.safetensors")


def test_weights_files_say_their_model_and_are_checked_strictly(tmp_path):
    f = nets.transformed("resnet18", num_classes=10)
    params, state = random_variables(f, jnp.zeros((1, 32, 32, 3)))
    nets.weights.save(tmp_path / "w.safetensors", params, state, model="resnet18")
    source = weight_sources.read(tmp_path / "w.safetensors", model="resnet50")   # the file's
    assert (source.model, source.num_classes) == ("resnet18", 10)
    got = weight_sources.variables(source)
    jax.tree.map(np.testing.assert_array_equal, got, (params, state))
    with pytest.raises(ValueError, match=r"does not fit resnet34 \(num_classes=10\)"):
        weight_sources.variables(source, "resnet34")


def test_what_is_not_weights_is_a_clear_error(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="a nets.weights .safetensors file, a PyTorch state dict"):
        weight_sources.read(tmp_path / "w.h5", model="resnet18")
    with pytest.raises(FileNotFoundError, match="no weights file or training workdir"):
        weight_sources.read(tmp_path / "missing.pth", model="resnet18")
