"""Data-parallel training: 2 processes with batch b end where 1 process with batch 2b does."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ..conftest import ROOT, run_cli, write_jsonl


def config(root, name, rows, batch_size, method="lora", n_eval=7, **training):
    """tiny-llama on 30 training rows (the last window is partial, so rank 1's slice of its last
    micro-batch is empty) and ``n_eval`` eval rows; LoRA without dropout, or full (FSDP2)."""
    train = write_jsonl(root / "train.jsonl", rows[:30])
    evalf = write_jsonl(root / "eval.jsonl", rows[30 : 30 + n_eval])
    lora = {"name": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    cfg = {
        "model": "tiny-llama",
        "output_dir": str(root / name),
        "method": lora if method == "lora" else {"name": method},
        "data": {"train": str(train), "eval": str(evalf), "max_length": 96},
        "training": {
            "num_epochs": 1,
            "batch_size": batch_size,
            "gradient_accumulation": 2,
            "learning_rate": 2e-3,
            "eval_steps": 2,
            "progress": False,
            "seed": 5,
            **training,
        },
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_processes_batch_b_equal_one_process_batch_2b(tmp_path, dates_rows):
    """LoRA (DDP-style gradient all-reduce); full fine-tuning (FSDP2) is tested below."""
    one = config(tmp_path, "one", dates_rows, 4)
    two = config(tmp_path, "two", dates_rows, 2)
    r = run_cli("train", str(one))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(two), "--nproc", "2")
    assert r.returncode == 0, r.stderr
    assert "2 processes" in r.stderr
    weights = "adapter/adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "one" / weights)), load_file(str(tmp_path / "two" / weights))
    assert a.keys() == b.keys()
    start = {k: torch.zeros_like(v) for k, v in a.items()}  # compare raw adapter weights
    for k in a:
        # The same update up to float summation order. Adam divides by sqrt(v), so a weight whose
        # gradient is ~0 can move by a few 1e-6 differently; compare whole update tensors.
        update = (a[k] - start[k]).norm()
        assert (a[k] - b[k]).norm() <= 1e-3 * update + 1e-7, k
    assert any((a[k] - start[k]).abs().max() > 1e-4 for k in a)  # training really moved weights
    # only rank 0 wrote: one metrics line per step, eval losses equal
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m1] == [x["step"] for x in m2]
    for x, y in zip(m1, m2, strict=True):
        if "eval_loss" in x:
            assert x["eval_loss"] == pytest.approx(y["eval_loss"], rel=1e-4)


def test_resume_across_ranks(tmp_path, dates_rows):
    clean = config(tmp_path, "clean", dates_rows, 2)
    killed = config(tmp_path, "killed", dates_rows, 2)
    assert run_cli("train", str(clean), "--nproc", "2").returncode == 0
    r = run_cli("train", str(killed), "--nproc", "2", env={"TUNEFORGE_FAULT_KILL_AT_STEP": "3"})
    assert r.returncode != 0
    r = run_cli("train", str(killed), "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr
    a = load_file(str(tmp_path / "clean" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    for k in a:
        assert a[k].equal(b[k]), k


# -- full fine-tuning: FSDP2 ----------------------------------------------------------------------
def full_config(root: Path, name: str, batch_size: int, **training) -> Path:
    """Full fine-tuning with 5 eval rows (rank 1 has one eval batch fewer than rank 0): with the
    partial last window, both make a rank run FSDP2 stand-in batches."""
    rows = [json.loads(x) for x in (ROOT / "examples/dates/train.jsonl").read_text().splitlines()]
    return config(root, name, rows, batch_size, "full", n_eval=5, **training)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """One process with batch 4 and two FSDP2 processes with batch 2, same data and seed."""
    root = tmp_path_factory.mktemp("full")
    one = run_cli("train", str(full_config(root, "one", 4)))
    assert one.returncode == 0, one.stderr
    two = run_cli("train", str(full_config(root, "two", 2)), "--nproc", "2")
    assert two.returncode == 0, two.stderr
    return root, one, two


def update_close(a: dict, b: dict, start: dict, rel: float = 1e-4) -> None:
    """``a`` and ``b`` made the same update from ``start`` up to float summation order (compared
    per tensor: Adam divides by sqrt(v), so single entries with ~0 gradient can differ more)."""
    assert a.keys() == b.keys()
    for k in a:
        update = (a[k] - start[k]).norm()
        assert (a[k] - b[k]).norm() <= rel * update + 1e-7, k


def test_fsdp2_two_processes_batch_b_equal_one_process_batch_2b(full_runs):
    from tuneforge.infer.runs import load_for_inference
    from tuneforge.models import resolve_model

    root, _, two = full_runs
    assert "2 processes (FSDP2: parameters sharded)" in two.stderr
    start = load_file(f"{resolve_model('tiny-llama')}/model.safetensors")
    # the run's model folder: the same files and keys as one process writes (tied head saved once)
    one_files = sorted(p.name for p in (root / "one" / "model").iterdir())
    assert sorted(p.name for p in (root / "two" / "model").iterdir()) == one_files
    a = load_file(str(root / "one" / "model" / "model.safetensors"))
    b = load_file(str(root / "two" / "model" / "model.safetensors"))
    assert "lm_head.weight" not in b and b.keys() == start.keys()
    update_close(a, b, start)  # measured: worst 9.4e-6 of the update's norm
    assert all((b[k] - start[k]).abs().max() > 1e-4 for k in b)  # every weight trained
    # checkpoints: full weights, and optimizer state in the single-process layout
    for step in (2, 4):
        ca, cb = (
            root / "one" / "checkpoints" / f"step-{step}",
            root / "two" / "checkpoints" / f"step-{step}",
        )
        update_close(
            load_file(str(ca / "trainable.safetensors")),
            load_file(str(cb / "trainable.safetensors")),
            start,
        )
        oa = torch.load(ca / "optimizer.pt", weights_only=True)
        ob = torch.load(cb / "optimizer.pt", weights_only=True)
        assert oa["param_groups"] == ob["param_groups"]
        assert oa["state"].keys() == ob["state"].keys()
        for i, sa in oa["state"].items():
            for name, t in sa.items():
                other = ob["state"][i][name]
                assert other.shape == t.shape  # unsharded
                assert (other - t).norm() <= 5e-4 * t.norm(), (i, name)  # measured: 7.0e-5
    # only rank 0 wrote: one metrics line per step and eval, one line per eval on the terminal
    m1 = [json.loads(x) for x in (root / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (root / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in m1] == [x["step"] for x in m2]
    for x, y in zip(m1, m2, strict=True):
        # the same loss and gradient (norm: Adam alone would hide a gradient scaled by N)
        for key in ("loss", "grad_norm", "eval_loss"):
            assert (key in x) == (key in y)
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=3e-4), key  # measured: 3.9e-5
    assert (two.stdout + two.stderr).count("step 2: eval_loss") == 1
    assert sorted(p.name for p in (root / "two").iterdir()) == sorted(
        p.name for p in (root / "one").iterdir()
    )
    # the saved model loads for inference, head still tied, and computes what one process's does
    ma, _ = load_for_inference(str(root / "one"), device="cpu")
    mb, _ = load_for_inference(str(root / "two"), device="cpu")
    assert mb.lm_head.weight.data_ptr() == mb.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 200, 300, 400, 2]])
    with torch.no_grad():
        assert torch.allclose(ma(ids).logits, mb(ids).logits, rtol=1e-4, atol=1e-4)


def test_fsdp2_checkpoint_resumes_in_one_process(full_runs, tmp_path):
    """A checkpoint written by 2 FSDP2 ranks (batch 2) resumes in 1 process (batch 4)."""
    from tuneforge.models import resolve_model

    root, _, _ = full_runs
    shutil.copytree(root / "two", tmp_path / "moved")
    shutil.rmtree(tmp_path / "moved" / "checkpoints" / "step-4")
    cfg = yaml.safe_load((root / "one.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / "moved")
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli("train", str(tmp_path / "moved.yaml"), "--resume")
    assert r.returncode == 0, r.stderr
    start = load_file(f"{resolve_model('tiny-llama')}/model.safetensors")
    update_close(
        load_file(str(root / "one" / "model" / "model.safetensors")),
        load_file(str(tmp_path / "moved" / "model" / "model.safetensors")),
        start,
    )


def test_fsdp2_resume_across_ranks(full_runs):
    """Killed after step 3 on 2 FSDP2 ranks and resumed on 2: bitwise the uninterrupted run."""
    root, _, _ = full_runs
    killed = full_config(root, "killed", 2)
    r = run_cli("train", str(killed), "--nproc", "2", env={"TUNEFORGE_FAULT_KILL_AT_STEP": "3"})
    assert r.returncode != 0
    assert not (root / "killed" / "model").exists()
    assert [p.name for p in (root / "killed" / "checkpoints").iterdir()] == ["step-2"]
    r = run_cli("train", str(killed), "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr
    for f in ("model/model.safetensors", "checkpoints/step-4/trainable.safetensors"):
        a = load_file(str(root / "two" / f))
        b = load_file(str(root / "killed" / f))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].equal(b[k]), (f, k)


def test_nproc_refuses_objectives_that_run_in_one_process():
    r = run_cli("train", "configs/ppo.yaml", "--nproc", "2")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --nproc: training.objective ppo runs in one process only; multi-process "
        "training covers objectives sft, reward, dpo, orpo and simpo"
    ]


# (reward, lora) is left out for time: its head's gradient takes the same flat all-reduce as every
# adapter weight (dpo, lora), and the head itself is covered sharded (reward, full)
@pytest.mark.parametrize(
    "objective,method", [("dpo", "lora"), ("dpo", "full"), ("reward", "full"), ("orpo", "lora")]
)
def test_pair_objectives_two_processes_batch_b_equal_one_process_batch_2b(
    tmp_path, objective, method
):
    """Reward modelling, DPO and ORPO across 2 processes as SFT: LoRA with the gradient
    all-reduce, full fine-tuning sharded with FSDP2 (the reward model's score head in the root
    group; DPO's reference log-probabilities computed before sharding; ORPO's two denominators,
    pairs and chosen tokens, each summed over both processes)."""
    from tuneforge.models import resolve_model

    prefs = [json.loads(x) for x in (ROOT / "examples/prefs/train.jsonl").read_text().splitlines()]
    one = config(tmp_path, "one", prefs, 4, method, objective=objective)
    two = config(tmp_path, "two", prefs, 2, method, objective=objective)
    r = run_cli("train", str(one))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", str(two), "--nproc", "2")
    assert r.returncode == 0, r.stderr
    assert "2 processes" + (" (FSDP2: parameters sharded)" if method == "full" else "") in r.stderr
    if method == "lora":  # LoRA B starts at zero: the weights are the update
        files = {"adapter/adapter_model.safetensors": {}}
    else:
        files = {
            "model/model.safetensors": load_file(f"{resolve_model('tiny-llama')}/model.safetensors")
        }
    if objective == "reward":
        files["reward_head.safetensors"] = {}
    for f, start in files.items():
        a, b = load_file(str(tmp_path / "one" / f)), load_file(str(tmp_path / "two" / f))
        assert a.keys() == b.keys()
        if f.startswith("reward"):  # the bias stays at zero; the weight is the update
            assert a["bias"].eq(0).all() and b["bias"].eq(0).all()
        for k in a:
            update = (a[k] - start.get(k, 0)).norm()
            assert (a[k] - b[k]).norm() <= 1e-3 * update + 1e-6, (f, k)
        moved = [k for k in a if (a[k] - start.get(k, 0)).abs().max() > 1e-4]
        assert moved and (method == "lora" or f.startswith("reward") or moved == list(a)), f
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["best_eval_loss"] == pytest.approx(s2["best_eval_loss"], rel=1e-4)
    if method == "full":  # the model a reward run saved is the one it scores with
        from tuneforge.train.reward import load_reward_model, score

        if objective == "reward":
            m1, tok = load_reward_model(tmp_path / "one", device="cpu")
            m2, _ = load_reward_model(tmp_path / "two", device="cpu")
            p = [[{"role": "user", "content": "When?"}]]
            assert score(m1, tok, p, ["Monday."]) == pytest.approx(
                score(m2, tok, p, ["Monday."]), rel=1e-3, abs=1e-4
            )
