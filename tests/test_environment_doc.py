"""docs/environment.md lists every EFFCONV_* variable the code reads, and no variable the code no longer reads."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the code that reads variables: the package, the kernels, the benchmarks and the test fixtures (EFFCONV_POISON)
SOURCES = [*(ROOT / "effconv").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *(ROOT / "bench").rglob("*.py"),
           ROOT / "tests" / "conftest.py", ROOT / "tests" / "kernels" / "conftest.py"]


def test_every_variable_the_code_reads_is_documented_and_nothing_else():
    read = set()
    for path in SOURCES:
        read |= set(re.findall(r"""["'](EFFCONV_[A-Z0-9_]+)["']""", path.read_text()))
    doc = (ROOT / "docs" / "environment.md").read_text()
    documented = set(re.findall(r"^\| `(EFFCONV_[A-Z0-9_]+)`", doc, flags=re.M))  # the tables' first column
    assert {"EFFCONV_CACHE", "EFFCONV_MOE_PINNED", "EFFCONV_POISON"} <= read  # the scan finds them at all
    assert read - documented == set(), "read by the code but not in docs/environment.md"
    assert documented - read == set(), "in docs/environment.md but read nowhere"
