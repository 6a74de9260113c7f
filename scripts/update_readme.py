"""Rewrite README's config reference from the config dataclasses (``make readme``).

The table sits between the markers ``<!-- config-reference:start -->`` and
``<!-- config-reference:end -->``; tests/test_readme.py fails when it is out of date.
"""

import sys
from pathlib import Path

from tuneforge.config import config_reference

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def render(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{config_reference()}\n{END}{tail}"


def main() -> int:
    text = README.read_text()
    new = render(text)
    if new != text:
        README.write_text(new)
        print("README.md: config reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
