import json
import os
import pathlib

import pytest

# Keras picks its backend once, at import: the Keras references run on JAX, not TensorFlow.
os.environ["KERAS_BACKEND"] = "jax"

# The reference figures live beside the repository (../shared); CI has them there.
PARAMS_JSON = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "params.json"


@pytest.fixture(scope="session")
def reference_counts():
    """{(source, name): row} from ../shared/reference/params.json."""
    if not PARAMS_JSON.exists():
        pytest.skip(f"{PARAMS_JSON} is not beside this checkout")
    return {(r["source"], r["name"]): r for r in json.loads(PARAMS_JSON.read_text())}
