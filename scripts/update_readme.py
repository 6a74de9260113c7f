"""Rewrite the docs' generated tables (``make readme``): the config reference from the config
dataclasses, and the methods x objectives matrix from tests/train/test_run_matrix.py's table with the
per-objective settings from the code.

Each table sits between its markers (``<!-- config-reference:start -->`` ... ``:end -->``,
``<!-- training-matrix:start -->`` ...); tests/test_readme.py fails when one is out of date.
(The pages are docs/configuration.md and docs/methods.md.)
"""

import sys
from pathlib import Path

from tuneforge.config import config_reference

ROOT = Path(__file__).resolve().parent.parent


def training_matrix() -> str:
    """Which method trains with which objective (the matrix test's table), and which settings
    apply to which objective (config validation and the run skeleton)."""
    sys.path.insert(0, str(ROOT))
    from tests.train.test_run_matrix import MATRIX, METHODS, OBJECTIVES
    from tuneforge.config import DATA_STEPS, Config
    from tuneforge.train import objective_run

    lines = ["| method | " + " | ".join(OBJECTIVES) + " |", "|---" * (len(OBJECTIVES) + 1) + "|"]
    for m in METHODS:
        cells = [
            "yes" if MATRIX[m, o] == "trains" else f"refused: {MATRIX[m, o]}" for o in OBJECTIVES
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| setting | " + " | ".join(OBJECTIVES) + " |"]
    lines.append("|---" * (len(OBJECTIVES) + 1) + "|")
    lines.append(
        "| `training.report_to`, `training.attn_implementation`, `data.dedup`, "
        "`data.mix`, `data.eval_split` | " + " | ".join(["yes"] * len(OBJECTIVES)) + " |"
    )
    for key, (objectives, _) in DATA_STEPS.items():
        cells = ["yes" if o in objectives else "refused" for o in OBJECTIVES]
        lines.append(f"| `data.{key}` | " + " | ".join(cells) + " |")
    cells = []
    for o in OBJECTIVES:
        cfg = Config()
        cfg.training.objective = o
        run = objective_run(cfg)
        cells.append("yes" if run.multi_process else "no")
    lines.append("| `--nproc N` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# the page each generated table lives in -> (marker name, what makes it)
BLOCKS = {
    ROOT / "docs/configuration.md": ("config-reference", config_reference),
    ROOT / "docs/methods.md": ("training-matrix", training_matrix),
}


def render(text: str, name: str, make) -> str:
    """``text`` with the table between ``<!-- name:start -->`` and ``<!-- name:end -->`` redone."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{make()}\n{end}{tail}"


def main() -> int:
    for path, (name, make) in BLOCKS.items():
        text = path.read_text()
        new = render(text, name, make)
        if new != text:
            path.write_text(new)
            print(f"{path.relative_to(ROOT)}: {name} updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
