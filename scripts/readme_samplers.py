"""README.md's sampler table, written from the registry (pdscli.samplers.REGISTRY).

    .venv/bin/python scripts/readme_samplers.py           # rewrite the table between its markers
    .venv/bin/python scripts/readme_samplers.py --check   # exit 1 if README.md's table is stale

tests/test_docs.py runs --check, so a sampler added to the registry fails the tests until the
table is regenerated.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdscli.fsutil import atomic_write_text  # noqa: E402
from pdscli.samplers import REGISTRY, SamplerInfo  # noqa: E402

README = REPO / "README.md"
BEGIN = "<!-- readme_samplers.py: begin -->"
END = "<!-- readme_samplers.py: end -->"


def calls(info: SamplerInfo) -> str:
    """Network calls for n steps as a formula in n: 'n', '2n', '2n - 1'."""
    per_step = info.nfe(2) - info.nfe(1)
    offset = info.nfe(1) - per_step
    head = "n" if per_step == 1 else f"{per_step}n"
    return head if offset == 0 else f"{head} {'+' if offset > 0 else '-'} {abs(offset)}"


def table() -> str:
    rows = ["| sampler | what it is | kind | network calls for n steps | grid |", "|---|---|---|---|---|"]
    for name, info in REGISTRY.items():
        kind = "deterministic" if info.deterministic else "stochastic"
        rows.append(f"| `{name}` | {info.summary} | {kind} | {calls(info)} | {info.grid} |")
    return "\n".join(rows) + "\n"


def with_table(text: str) -> str:
    """`text` with the region between the markers replaced by the current table."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's table is not the registry's")
    args = ap.parse_args(argv)
    text = README.read_text()
    new = with_table(text)
    if args.check:
        if new != text:
            print("README.md's sampler table is stale: run scripts/readme_samplers.py", file=sys.stderr)
            return 1
        return 0
    atomic_write_text(README, new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
