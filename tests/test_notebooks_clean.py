"""Committed notebooks are clean inputs for papermill: valid, named NN_name.ipynb, one `parameters` cell,
no outputs, no execution counts, no cell left over from an executed copy."""

from pathlib import Path

import nbformat
import pytest

from uniperceiver_v2.walkthrough import pipeline as reproduce
from uniperceiver_v2.walkthrough.pipeline import NOTEBOOK_PATTERN, PARAMETERS_TAG

ROOT = Path(__file__).resolve().parents[1]
SERIES = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIXTURES = sorted((ROOT / "tests" / "fixtures" / "notebooks").glob("*.ipynb"))
ALL = SERIES + FIXTURES


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_series_exists_and_numbers_are_unique():
    assert SERIES, "notebooks/ holds no notebook"
    numbers = [path.name[:2] for path in SERIES]
    assert len(numbers) == len(set(numbers)), numbers


@pytest.mark.parametrize("path", ALL, ids=_id)
def test_name_is_number_underscore_name(path):
    assert NOTEBOOK_PATTERN.match(path.name), f"{path.name}: expected NN_lowercase_name.ipynb"


@pytest.mark.parametrize("path", ALL, ids=_id)
def test_notebook_validates(path):
    nbformat.validate(nbformat.read(path, as_version=4))


@pytest.mark.parametrize("path", ALL, ids=_id)
def test_no_outputs_and_no_execution_counts(path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs or execution counts; clear them before committing"
    assert "papermill" not in notebook.metadata, f"{path.name}: this is an executed papermill copy"


@pytest.mark.parametrize("path", ALL, ids=_id)
def test_exactly_one_parameters_cell_and_no_injected_one(path):
    notebook = nbformat.read(path, as_version=4)
    tags = [cell.metadata.get("tags", []) for cell in notebook.cells]
    tagged = [i for i, cell_tags in enumerate(tags) if PARAMETERS_TAG in cell_tags]
    assert len(tagged) == 1, f"{path.name}: cells tagged '{PARAMETERS_TAG}': {tagged}"
    assert notebook.cells[tagged[0]].cell_type == "code"
    assert not any("injected-parameters" in cell_tags for cell_tags in tags), f"{path.name}: injected parameters"


@pytest.mark.parametrize("path", ALL, ids=_id)
def test_papermill_reads_every_parameter(path):
    """papermill drops assignments it cannot parse; the runner would then call them unknown parameters."""
    assert reproduce.declared_parameters(path)
