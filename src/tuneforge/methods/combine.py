"""``tuneforge adapters combine``: a weighted combination of LoRA runs, saved as a new run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from tuneforge.errors import TuneforgeError
from tuneforge.files import atomic_folder, check_output_folder
from tuneforge.infer.runs import is_run, run_base_model
from tuneforge.methods import adapter_kind, read_adapter_config
from tuneforge.methods.peft_methods import combine_lora_weights


def combine_runs(
    runs: list[str | Path], weights: list[float], out: str | Path, overwrite: bool = False
) -> Path:
    """Save a run folder at ``out`` whose LoRA update is sum_i weights[i] * update of runs[i].

    The result is a normal run (config.yaml + adapter/ + tokenizer): ``generate``, ``merge`` and
    ``peft`` load it. ``combine.json`` records the sources and weights.

    Raises:
        TuneforgeError: fewer than two runs, a weight count that differs, a run that is not a
            LoRA run (DoRA, IA3 and the rest do not combine linearly), different base models or
            target layers, or ``out`` exists without ``overwrite``.
    """
    runs = [Path(r) for r in runs]
    out = Path(out)
    if len(runs) < 2:
        raise TuneforgeError("combine needs at least two runs")
    if len(weights) != len(runs):
        raise TuneforgeError(
            f"--weights has {len(weights)} values for {len(runs)} runs; give one weight per run"
        )
    for run in runs:
        if not is_run(run) or not (run / "adapter" / "adapter_config.json").is_file():
            raise TuneforgeError(f"'{run}' is not a run folder with an adapter/")
        kind = adapter_kind(run / "adapter")
        if kind != "lora":
            raise TuneforgeError(
                f"'{run}' holds a {kind} adapter; only lora adapters combine into one "
                "(their updates B·A add linearly)"
            )
    bases = [run_base_model(r) for r in runs]
    if len(set(bases)) > 1:
        raise TuneforgeError(
            f"the runs were trained on different base models ({', '.join(sorted(set(bases)))})"
        )
    check_output_folder(out, overwrite)
    configs = [read_adapter_config(r / "adapter") for r in runs]
    states = [load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in runs]
    config, tensors = combine_lora_weights(configs, states, weights)

    with atomic_folder(out) as tmp:
        _write_combined(tmp, runs, out, config, tensors, weights, bases[0])
    return out


def _write_combined(tmp: Path, runs: list[Path], out: Path, config, tensors, weights, base) -> None:
    """The combined run's files into the folder ``tmp`` (renamed to ``out`` when done)."""
    (tmp / "adapter").mkdir()
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp / "adapter" / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in (runs[0] / "adapter").iterdir():  # the tokenizer the runs were trained with
        if f.is_file() and not f.name.startswith("adapter_"):
            shutil.copy2(f, tmp / "adapter" / f.name)
    run_cfg = yaml.safe_load((runs[0] / "config.yaml").read_text())
    run_cfg["output_dir"] = str(out)
    run_cfg["method"].update(r=config["r"], lora_alpha=config["lora_alpha"], use_rslora=False)
    (tmp / "config.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    provenance = {"runs": [str(r) for r in runs], "weights": list(weights), "base": base}
    (tmp / "combine.json").write_text(json.dumps(provenance, indent=2) + "\n")
