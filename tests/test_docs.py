"""The documentation's promises point at tests that exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_the_reliability_catalogue_names_exists():
    catalogue = (REPO / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"\b(test_\w+)(?!\w|\.py)", catalogue))  # test functions, not test_x.py files
    defined = set()
    for path in (REPO / "tests").glob("test_*.py"):
        defined.update(re.findall(r"^\s*def (test_\w+)", path.read_text(), flags=re.M))
    assert len(named) > 40, "the catalogue names the tests that hold its promises"
    # `test_the_folder_lock_*` names a family of tests by its prefix.
    missing = [n for n in named if n not in defined and not (n.endswith("_") and any(d.startswith(n) for d in defined))]
    assert sorted(missing) == []
