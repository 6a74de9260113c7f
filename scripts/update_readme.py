"""Rewrite README's generated tables (``make readme``): the config reference from the config
dataclasses, and the methods x objectives matrix from tests/test_run_matrix.py's table with the
per-objective settings from the code.

Each table sits between its markers (``<!-- config-reference:start -->`` ... ``:end -->``,
``<!-- training-matrix:start -->`` ...); tests/test_readme.py fails when one is out of date.
"""

import sys
from pathlib import Path

from tuneforge.config import config_reference

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def training_matrix() -> str:
    """Which method trains with which objective (the matrix test's table), and which settings
    apply to which objective (config validation and the run skeleton)."""
    sys.path.insert(0, str(ROOT))
    from tests.test_run_matrix import MATRIX, METHODS, OBJECTIVES
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
        cells.append("no" if not run.multi_process else "yes" if run.shards_full else "adapters")
    lines.append("| `--nproc N` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


BLOCKS = {"config-reference": config_reference, "training-matrix": training_matrix}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{make()}\n{end}{tail}"
    return text


def main() -> int:
    text = README.read_text()
    new = render(text)
    if new != text:
        README.write_text(new)
        print("README.md: generated tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
