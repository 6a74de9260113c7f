"""Optional metric loggers the training loop calls next to metrics.jsonl (``training.report_to``)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import TuneforgeError

# metrics.jsonl keys with a tag of their own; every other number of a record is a curve too:
# ``eval_x`` -> ``eval/x``, ``x`` -> ``train/x`` (DPO's rewards_margin, PPO's reward and kl, ...)
TAGS = {"lr": "train/learning_rate"}
BOOKKEEPING = {"step", "epoch", "best_step", "seconds"}


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key."""
    if key in TAGS:
        return TAGS[key]
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class TensorBoardLogger:
    """Writes each logged metrics record as TensorBoard scalars under ``<run>/tensorboard``.

    Args:
        log_dir: folder for the event files.

    Raises:
        TuneforgeError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TuneforgeError(
                "training.report_to: tensorboard needs the tensorboard package: "
                "pip install 'tuneforge[tensorboard]'"
            ) from None
        self.log_dir = log_dir
        self._writer_class = SummaryWriter
        self.writer = None  # made on the first record, so nothing is written before training

    def log(self, record: dict) -> None:
        """Add the scalars of one metrics.jsonl record at its step."""
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.log_dir))
        step = int(record["step"])
        for key, value in record.items():
            if key not in BOOKKEEPING and type(value) in (int, float):
                self.writer.add_scalar(tag(key), float(value), step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def make_loggers(report_to: str, run_dir: Path) -> list:
    """The loggers ``training.report_to`` asks for (empty for 'none')."""
    if report_to == "tensorboard":
        return [TensorBoardLogger(run_dir / "tensorboard")]
    return []
