"""tools.export: a batch-polymorphic StableHLO artifact that runs without this package."""

import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import nets
from tests.helpers import jitted_apply, random_images, random_variables
from tools import export as export_tool

# Runs in a fresh interpreter: only jax and numpy, and it checks that nothing else came in.
LOADER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    blob = open(sys.argv[1], "rb").read()
    run = jax.export.deserialize(bytearray(blob)).call
    for path in sys.argv[2:]:
        np.save(path + ".out.npy", np.asarray(run(np.load(path))))
    assert not any(m == "nets" or m.startswith(("nets.", "haiku", "tools")) for m in sys.modules)
""")


@pytest.fixture(scope="module")
def resnet18():
    f = nets.transformed("resnet18", 10)
    return random_variables(f, nets.introspect.example_images("resnet18", 1, 32))


def test_exported_forward_equals_apply_for_any_batch(resnet18, tmp_path):
    params, state = resnet18
    blob = export_tool.export("resnet18", params, state, size=32)
    (tmp_path / "model.jaxexport").write_bytes(blob)
    x = random_images(3, 32)
    inputs = {1: x[:1], 3: x}
    for b, images in inputs.items():
        np.save(tmp_path / f"x{b}.npy", images)
    subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "model.jaxexport"),
                    *(str(tmp_path / f"x{b}.npy") for b in inputs)], check=True)
    # Eval-mode BN makes examples independent: batch 1 is the first row of batch 3.
    expected, _ = jitted_apply("resnet18", 10)(params, state, None, x, is_training=False)
    for b in inputs:
        ours = np.load(tmp_path / f"x{b}.npy.out.npy")
        assert ours.shape == (b, 10)
        np.testing.assert_allclose(ours, expected[:b], atol=1e-5, rtol=0)


def test_exported_shape_is_checked(resnet18):
    params, state = resnet18
    run = export_tool.load(export_tool.export("resnet18", params, state, size=32))
    with pytest.raises(Exception, match="shape"):
        run(random_images(1, 64))
    with pytest.raises(ValueError, match="size must be positive"):
        export_tool.export("resnet18", params, state, size=0)


def test_command_writes_the_fused_artifact(resnet18, tmp_path, capsys, monkeypatch):
    # The command's random init compiles slowly on CPU; the fixture's variables stand in.
    monkeypatch.setattr(export_tool, "load_variables", lambda *args: resnet18)
    out = tmp_path / "m.jaxexport"
    export_tool.main(["resnet18", "--out", str(out), "--num-classes", "10", "--size", "32",
                      "--fused"])
    exported = jax.export.deserialize(bytearray(pathlib.Path(out).read_bytes()))
    assert str(exported.in_avals[0].shape) == "(b, 32, 32, 3)"
    assert exported.out_avals[0].shape[1:] == (10,)
    assert "wrote" in capsys.readouterr().out
    # --fused: BatchNorms folded into the convs (nets.fusion), the same function.
    assert "rsqrt" not in exported.mlir_module()
    x = random_images(2, 32)
    params, state = resnet18
    expected, _ = jitted_apply("resnet18", 10)(params, state, None, x, is_training=False)
    np.testing.assert_allclose(exported.call(x), expected, atol=1e-5, rtol=0)


def test_missing_or_unknown_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export_tool.load_variables("resnet18", str(tmp_path / "missing.pth"))
    (tmp_path / "w.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="PyTorch state dict"):
        export_tool.load_variables("resnet18", str(tmp_path / "w.h5"))


def test_tools_read_nets_weights_files(resnet18, tmp_path):
    """--weights takes the files tools.convert writes (nets.weights), as well as PyTorch's."""
    params, state = resnet18
    path = tmp_path / "resnet18.safetensors"
    nets.weights.save(path, params, state, model="resnet18")
    loaded_params, loaded_state = export_tool.load_variables("resnet18", str(path))
    jax.tree.map(np.testing.assert_array_equal, (loaded_params, loaded_state), (params, state))
