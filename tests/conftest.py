import os

import pytest

from tests.helpers import TEST_XLA_FLAGS

# Keras picks its backend once, at import: the Keras references run on JAX, not TensorFlow.
os.environ["KERAS_BACKEND"] = "jax"
# Read when the first computation starts a backend, which no import does.
os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()


@pytest.fixture(scope="session")
def reference_counts():
    """{(source, name): row} from tests/reference/params.json (timm, torchvision, keras)."""
    from tests.helpers import reference_figures

    return {(r["source"], r["name"]): r for r in reference_figures("params.json")}


@pytest.fixture(scope="session")
def detection_data_dir(tmp_path_factory) -> str:
    """A data dir with the built-in detection dataset, prepared once for the whole session:
    shared by the xdist workers (their base temp dirs share a parent; preparing takes a lock)."""
    from data import builtin_detection

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    directory = root / "builtin_detection_tfds"
    builtin_detection.prepare(directory)
    return str(directory)


def pytest_addoption(parser):
    parser.addoption(
        "--fail-on-skip", action="store_true",
        help="fail the session if any test is skipped: with the test extra installed nothing "
             "should skip, so a skip means a broken reference install (scripts/test.sh sets it)")


_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    # Under xdist the controller receives every worker's reports through this hook too.
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    if (session.config.getoption("--fail-on-skip") and _SKIPPED
            and not hasattr(session.config, "workerinput")
            and exitstatus == pytest.ExitCode.OK):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    if config.getoption("--fail-on-skip") and _SKIPPED:
        terminalreporter.write_line(
            f"--fail-on-skip: {len(_SKIPPED)} test(s) skipped, which fails the run (is the "
            "test extra installed?): " + ", ".join(_SKIPPED[:10]), red=True)


# The files that take longest (minutes each, most of it in train.py runs and notebook runs), run
# first: scripts/test.sh keeps this order across its workers (--no-loadscope-reorder), so the
# cheap files fill in around them instead of one long file running alone at the end.
SLOW_FILES_FIRST = ("test_train.py", "test_train_detection.py", "test_notebook.py",
                    "test_train_keypoints.py", "test_keypoints.py", "test_evaluate_predict.py",
                    "test_train_distill.py", "test_all_models.py", "test_resnet_reference.py",
                    "test_nfnet.py", "test_efficientnet.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
