"""What the GPU machine lacks for this project, and a folder with what bench/gpu_check.py needs
there (``--carry-list`` and ``--stage`` of bench/gpu_check.py).

The lent machine's image has torch 2.11 (CUDA 13), transformers 5.17, peft and accelerate;
nothing can be downloaded there and 64 MiB of ignored files may be carried with the tree. The
list is read from this environment's package metadata (what the four image packages need counts
as there), the versions from requirements.lock; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ("torch", "transformers", "peft", "accelerate")
# bitsandbytes ships a library per CUDA / ROCm / XPU version (123 MiB); torch 2.11 on CUDA 13
# loads the cuda130 (or cuda132) one, and the CPU one serves the CPU reference runs
KEEP_BNB_LIBS = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so")  # fmt: skip


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots) -> tuple[set[str], set[str]]:
    """(installed distributions ``roots`` need, transitively, extras left out; those needed but
    not installed here)."""
    from packaging.requirements import Requirement

    seen, missing, todo = set(), set(), [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen or name in missing:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(name)
            continue
        seen.add(name)
        for req in map(Requirement, dist.requires or ()):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return seen, missing


def in_image() -> set[str]:
    return closure(IMAGE)[0]


def carry_list() -> list[dict]:
    """The runtime dependencies (pyproject.toml) plus trl and bitsandbytes that the image lacks,
    transitively: name, locked version, the size of its wheel in pip's cache (or None), its
    installed size here, whether pyproject (or the task) names it directly."""
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r).name for r in project["dependencies"]] + ["trl", "bitsandbytes"]
    text = (ROOT / "requirements.lock").read_text()
    lock = {canonical(k): v for k, v in re.findall(r"^([\w.\-]+)==([^\s;\\]+)", text, re.M)}
    wheels = {}
    for folder in (Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache/pip")), ROOT / ".whl"):  # fmt: skip
        for w in folder.rglob("*.whl") if folder.is_dir() else ():
            name, version = w.name.split("-")[:2]
            wheels[(canonical(name), version)] = w
    needed, missing = closure(roots)
    rows = []
    for name in sorted((needed | missing) - in_image()):
        version = lock.get(name) or (metadata.version(name) if name in needed else "?")
        wheel = wheels.get((name, version))
        files = (metadata.distribution(name).files or []) if name in needed else []
        rows.append({
            "name": name,
            "version": version,
            "wheel_mb": wheel.stat().st_size / 2**20 if wheel else None,
            "installed_mb": sum(f.size or 0 for f in files) / 2**20,
            "direct": name in map(canonical, roots),
        })  # fmt: skip
    return rows


def print_carry_list() -> None:
    rows = carry_list()
    print("Not in the GPU image (torch 2.11 + CUDA 13, transformers 5.17, peft, accelerate and")
    print("what they need): tuneforge's runtime dependencies, trl and bitsandbytes, transitively.")
    print("\n| package | version | wheel in pip's cache | installed here | |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        wheel = f"{r['wheel_mb']:.2f} MiB" if r["wheel_mb"] is not None else "not cached"
        direct = "direct" if r["direct"] else ""
        print(
            f"| {r['name']} | {r['version']} | {wheel} | {r['installed_mb']:.2f} MiB | {direct} |"
        )
    cached = sum(r["wheel_mb"] or 0 for r in rows)
    installed = sum(r["installed_mb"] for r in rows)
    print(
        f"\n{len(rows)} packages; their wheels in pip's cache here: {cached:.1f} MiB; installed, "
        f"all of them: {installed:.0f} MiB (64 MiB may be carried)."
    )
    bnb = next((r for r in rows if r["name"] == "bitsandbytes"), None)
    if bnb:
        print(
            f"bitsandbytes alone is {bnb['installed_mb']:.0f} MiB installed (a library per CUDA, "
            f"ROCm and XPU version): the wheel does not fit. `bench/gpu_check.py --stage DIR` "
            f"copies it with only {', '.join(KEEP_BNB_LIBS)} ({trimmed_bnb_mb():.1f} MiB)."
        )
    print(
        "bench/gpu_check.py needs none of these but bitsandbytes (QLoRA, paged AdamW), and the "
        "tiny models' tokenizer (3.5 MB, also from --stage): the built-in model is not there. "
        "Its results.json lists what its processes imported from outside the image."
    )


def _bnb_files() -> tuple[Path, list[Path]]:
    root = Path(importlib.util.find_spec("bitsandbytes").origin).parent
    keep = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix != ".so" or p.name in KEEP_BNB_LIBS)
    ]
    return root, keep


def trimmed_bnb_mb() -> float:
    return sum(p.stat().st_size for p in _bnb_files()[1]) / 2**20


def stage(dest: Path) -> None:
    """Copy from this environment (no download) what bench/gpu_check.py needs on the GPU
    machine: ``dest/cache``, a TUNEFORGE_CACHE whose built-in model folder holds the tokenizer
    only (the tiny models are built from it there), and ``dest/site`` (for PYTHONPATH) with
    bitsandbytes holding only its CUDA 13 and CPU libraries, and its dist-info (peft and
    transformers read its version)."""
    from tuneforge.models import BUILTIN, builtin_path

    folder = dest / "cache" / "models" / BUILTIN
    folder.mkdir(parents=True, exist_ok=True)
    for f in builtin_path().iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, folder / f.name)
    if importlib.util.find_spec("bitsandbytes") is not None:
        root, files = _bnb_files()
        for f in files:
            target = dest / "site" / "bitsandbytes" / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        info = Path(metadata.distribution("bitsandbytes")._path)
        shutil.copytree(info, dest / "site" / info.name, dirs_exist_ok=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) / 2**20
    print(
        f"{dest}: {size:.1f} MiB. On the GPU machine: PYTHONPATH=src:{dest}/site python "
        f"bench/gpu_check.py --cache {dest}/cache --out OUT"
    )
