import os

import pytest

# Keras picks its backend once, at import: the Keras references run on JAX, not TensorFlow.
os.environ["KERAS_BACKEND"] = "jax"


@pytest.fixture(scope="session")
def reference_counts():
    """{(source, name): row} from tests/reference/params.json (timm, torchvision, keras)."""
    from tests.helpers import reference_figures

    return {(r["source"], r["name"]): r for r in reference_figures("params.json")}
