"""README and docs stay true: the generated tables match the code, every relative link resolves,
the README stays a short manual, and the set-up commands are there."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench/RESULTS.md"]


def _script():
    spec = importlib.util.spec_from_file_location(
        "update_readme", ROOT / "scripts/update_readme.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_tables_are_current():
    mod = _script()
    for path, (name, make) in mod.BLOCKS.items():
        text = path.read_text()
        assert mod.render(text, name, make) == text, (
            f"{path.name}: {name} is stale: run make readme"
        )


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:|#", target):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_readme_is_a_short_manual_with_the_setup_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 25_000
    assert "make demo" in text and "make test" in text and "make lock" in text
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert len(list((ROOT / "docs").glob("*.md"))) >= 6
