"""accel/memory.py: with glibc's mmap threshold fixed, freed tensors leave the process; without
it, they stay as heap holes (the gap between estimated and measured peak memory)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.accel import kernels
from tuneforge.accel.memory import find_jemalloc

SRC = str(Path(__file__).resolve().parents[2] / "src")
# 100 tensors of 2 MiB between small survivors, then the big ones freed: how much RSS stays?
SCRIPT = """
import sys
from pathlib import Path
import torch

def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if sys.argv[1] == "set":
    from tuneforge.accel.memory import return_freed_memory
    assert return_freed_memory()
x = torch.ones(2**20)  # a 4 MiB block freed: glibc's dynamic threshold rises to 4 MiB
del x
before = rss_mib()
big, small = [], []
for _ in range(100):
    big.append(torch.ones(2**19))
    small.append(torch.ones(16))
del big
print(rss_mib() - before)
"""


def plain_env() -> dict[str, str]:
    """This process's environment without allocator settings (MALLOC_*, LD_PRELOAD): glibc's
    own malloc, whatever the test process runs with."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "LD_PRELOAD"))}


def kept_mib(mode: str) -> float:
    env = {**plain_env(), "PYTHONPATH": SRC}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_tensors_leave_the_process_once_the_threshold_is_fixed():
    default, fixed = kept_mib("default"), kept_mib("set")
    print(f"RSS kept after freeing 200 MiB of 2 MiB tensors: glibc default {default:.0f} MiB, "
          f"threshold fixed {fixed:.0f} MiB")  # fmt: skip
    assert fixed < 20
    assert default > 150  # what the setting is for: glibc's default keeps the freed heap


def test_a_threshold_from_the_environment_is_left_alone(monkeypatch):
    from tuneforge.accel.memory import return_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_freed_memory() is False


# `tuneforge train` re-executes itself with jemalloc preloaded when it finds the library.


def _train_cli(tmp_path: Path, env: dict, name: str):
    from tests.conftest import write_jsonl

    rows = [{"instruction": f"Say {i}", "output": f"word {i}"} for i in range(8)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / name
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: tiny-llama\noutput_dir: {out}\ndata: {{train: {data}, max_length: 64}}\n"
        "training: {max_steps: 1, progress: false}\nmethod: {name: lora, r: 2}\n"
    )
    clean = {k: v for k, v in plain_env().items() if not k.startswith("TUNEFORGE_MALLOC")}
    r = subprocess.run(
        [sys.executable, "-m", "tuneforge", "train", str(config)],
        capture_output=True,
        text=True,
        env={**clean, "PYTHONPATH": SRC, **env},
        timeout=600,
    )
    return r, out


def _summary_malloc(out: Path) -> str:
    return json.loads((out / "summary.json").read_text())["malloc"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD: Linux only")
def test_train_reexecutes_with_the_jemalloc_it_finds(tmp_path):
    """A stand-in library named libjemalloc.so.2 (an empty shared object built here, since a clean
    CI machine may lack jemalloc) in $CONDA_PREFIX/lib: the re-executed run has it mapped; with
    TUNEFORGE_MALLOC=glibc it is left out."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in library")
    lib = tmp_path / "prefix" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "empty.c").write_text("int tuneforge_standin = 1;\n")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-o", str(lib / "libjemalloc.so.2"), str(tmp_path / "empty.c")],
        check=True,
    )
    prefix = {"CONDA_PREFIX": str(tmp_path / "prefix")}
    r, out = _train_cli(tmp_path, prefix, "with")
    assert r.returncode == 0, r.stderr
    assert _summary_malloc(out) == "jemalloc"
    r, out = _train_cli(tmp_path, {**prefix, "TUNEFORGE_MALLOC": "glibc"}, "without")
    assert r.returncode == 0, r.stderr
    assert _summary_malloc(out) == "system"


@pytest.mark.skipif(find_jemalloc() is None, reason="jemalloc is not installed here")
def test_train_runs_under_the_real_jemalloc(tmp_path):
    from tuneforge.accel.memory import JEMALLOC_CONF

    r, out = _train_cli(tmp_path, {}, "run")
    assert r.returncode == 0, r.stderr
    assert _summary_malloc(out) == "jemalloc"
    # the re-executed run keeps its freed pages (the caller's MALLOC_CONF was removed)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["malloc_conf"] == JEMALLOC_CONF
    # and the fused CPU kernels ran in it (built by `make install`, or on first use)
    assert summary["cpu_kernels"] is (kernels.compiler() is not None)


def test_a_wrong_allocator_choice_is_one_line(tmp_path):
    r, out = _train_cli(tmp_path, {"TUNEFORGE_MALLOC": "tcmalloc"}, "run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: TUNEFORGE_MALLOC='tcmalloc': use jemalloc or glibc"
    ]
    assert not out.exists()


def test_the_demo_says_a_wrong_allocator_choice_in_one_line():
    """`make demo` re-executes itself as `tuneforge train` does, and stops the same way."""
    from ..conftest import ROOT

    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dates" / "demo.py")],
        env={**os.environ, "TUNEFORGE_MALLOC": "tcmalloc"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: TUNEFORGE_MALLOC='tcmalloc': use jemalloc or glibc"
    ]


# jemalloc keeps the pages a step frees (JEMALLOC_CONF), so the next step does not fault them in.
FAULTS_SCRIPT = """
import resource
import torch

def step():
    x = torch.ones(2**24)  # 64 MiB, written: every page touched
    y = torch.ones(2**20)  # 4 MiB, the normal arenas
    del x, y

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(extra_conf: str | None) -> int:
    from tuneforge.accel.memory import preload_jemalloc

    env = plain_env()
    if extra_conf:
        env["MALLOC_CONF"] = extra_conf
    env = preload_jemalloc(env)
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_the_callers_malloc_conf_comes_after_ours(monkeypatch):
    from tuneforge.accel import memory

    monkeypatch.setattr(memory, "find_jemalloc", lambda: "/lib/libjemalloc.so.2")
    env = memory.preload_jemalloc({"MALLOC_CONF": "narenas:1", "LD_PRELOAD": "/x.so"})
    assert env["MALLOC_CONF"] == f"{memory.JEMALLOC_CONF},narenas:1"
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2 /x.so"
    assert memory.preload_jemalloc({})["MALLOC_CONF"] == memory.JEMALLOC_CONF


@pytest.mark.skipif(find_jemalloc() is None, reason="jemalloc is not installed here")
def test_jemalloc_keeps_freed_pages_for_the_next_step():
    """Ten steps of a 64 MiB and a 4 MiB tensor: with the preload's options the pages are reused
    (almost no faults); with jemalloc's own decay (caller's MALLOC_CONF, which wins) every step
    faults the 64 MiB block in again (16,384 pages a step)."""
    kept = _faults(None)
    default = _faults("dirty_decay_ms:10000,muzzy_decay_ms:0")
    print(f"minor faults over 10 steps: kept {kept}, jemalloc's default decay {default}")
    assert kept < 2000
    assert default > 10 * 16384 * 0.9
