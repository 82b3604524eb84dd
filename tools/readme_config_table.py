"""Regenerate README.md's configuration table from the schema in fastnn/config.py.

Usage: ``python tools/readme_config_table.py`` (rewrites README.md in place) or
``python tools/readme_config_table.py --check`` (exit 1 when the README is out of date).
"""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN = "<!-- fastnn:config-table:begin -->"
END = "<!-- fastnn:config-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the table markers replaced by ``table``."""
    head, begin, rest = readme.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"README.md lacks the markers {BEGIN} ... {END}")
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(README.parent))
    from fastnn.config import markdown_table

    text = README.read_text()
    updated = with_table(text, markdown_table())
    if "--check" in argv:
        if updated != text:
            print("README.md's configuration table is out of date: run this without --check")
            return 1
        return 0
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
