import pathlib

from tools.model_table import model_table

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_model_table_is_the_registry():
    assert f"<!-- model-table:begin -->\n{model_table()}\n<!-- model-table:end -->" in (
        ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    assert "./scripts/test.sh" in (ROOT / "README.md").read_text()
    assert "./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
