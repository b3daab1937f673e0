"""Check that the bounce accuracy report is current, explains every disagreement, and shows
the classifier no worse than flufl.bounce."""

from __future__ import annotations

import pytest

from sequencer import bounce_accuracy
from sequencer.bounce_accuracy import FLUFL_BOUNCE, SEQUENCER, FileResult
from tests.conftest import CORPUS, REPO

BOUNCES_DIR = CORPUS / "bounces"
REPORT = REPO / bounce_accuracy.REPORT_FILE

if not (BOUNCES_DIR / "index.tsv").is_file():
    pytest.skip(f"bounce corpus not found at {BOUNCES_DIR}", allow_module_level=True)
pytest.importorskip(
    "flufl.bounce", reason="flufl.bounce is not installed; install the dev extras (.[dev])"
)

INDEX_CLASSES = {row.expected_class for row in bounce_accuracy.read_index(BOUNCES_DIR)}
COMPARED_CLASSES = [name for name in bounce_accuracy.FLUFL_BOUNCE_CLASSES if name in INDEX_CLASSES]


@pytest.fixture(scope="module")
def results() -> list[FileResult]:
    return bounce_accuracy.evaluate(BOUNCES_DIR)


def test_report_is_current(results: list[FileResult]) -> None:
    expected = bounce_accuracy.render_report(results).encode("utf-8")

    assert REPORT.read_bytes() == expected, (
        f"{bounce_accuracy.REPORT_FILE} is out of date; regenerate it from the repository root "
        f"with: python -m sequencer.bounce_accuracy {BOUNCES_DIR} "
        f"--output {bounce_accuracy.REPORT_FILE}"
    )


def test_disagreements_explained(results: list[FileResult]) -> None:
    disagreements = {
        (tool, result.row.file) for tool, result in bounce_accuracy.find_disagreements(results)
    }

    unexplained = disagreements - bounce_accuracy.EXPLANATIONS.keys()
    assert not unexplained, f"add these (tool, file) keys to EXPLANATIONS: {sorted(unexplained)}"


def test_no_stale_explanations(results: list[FileResult]) -> None:
    disagreements = {
        (tool, result.row.file) for tool, result in bounce_accuracy.find_disagreements(results)
    }

    stale = bounce_accuracy.EXPLANATIONS.keys() - disagreements
    assert not stale, f"these (tool, file) keys no longer disagree, remove them: {sorted(stale)}"


@pytest.mark.parametrize("expected_class", COMPARED_CLASSES)
def test_class_accuracy_not_below_flufl(results: list[FileResult], expected_class: str) -> None:
    ours = bounce_accuracy.score_by_class(results, SEQUENCER)[expected_class]
    theirs = bounce_accuracy.score_by_class(results, FLUFL_BOUNCE)[expected_class]

    assert ours.class_correct >= theirs.class_correct, (
        f"{expected_class}: the classifier gets {ours.class_correct} of {ours.files} files "
        f"right, flufl.bounce {theirs.class_correct}"
    )
