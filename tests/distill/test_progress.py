"""`distill.progress`: progress lines on a console that is not a terminal, a step-counted Rich bar on one.

Both run a real `pl.Trainer.fit` of a tiny regression module (a few steps, gradient accumulation 2 so that batches
and optimizer steps differ)."""

import io
import logging

import pytest
import pytorch_lightning as pl
import rich
import torch
from torch.utils.data import DataLoader, Dataset

from distill.logs import configure_logging, reset_logging
from distill.progress import ProgressLog, StepProgressBar, format_duration, progress_callbacks


class _Pairs(Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "target": self.y[i]}


class _Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(self.net(batch["image"]).squeeze(-1), batch["target"])
        self.log("train/loss", loss, batch_size=len(batch["image"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = torch.nn.functional.mse_loss(self.net(batch["image"]).squeeze(-1), batch["target"])
        self.log("val/mse", loss, batch_size=len(batch["image"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(tmp_path, callbacks, enable_progress_bar, max_steps=4):
    trainer = pl.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        val_check_interval=4,  # batches: validation after optimizer step 2
        check_val_every_n_epoch=None,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    loader = DataLoader(_Pairs(), batch_size=4)
    trainer.fit(_Regression(), loader, DataLoader(_Pairs(8), batch_size=4))
    return trainer


@pytest.fixture
def log_stream():
    stream = io.StringIO()
    configure_logging(0, stream=stream)
    yield stream
    reset_logging()


def test_non_tty_console_gets_progress_lines_with_rate_loss_and_eta(tmp_path, log_stream):
    console = io.StringIO()  # not a terminal, like stdout under nohup / CI / SLURM
    callbacks, bar = progress_callbacks(True, stream=console, every_n_steps=2)
    assert bar is False and [type(c) for c in callbacks] == [ProgressLog]
    trainer = _fit(tmp_path, callbacks, bar)
    assert trainer.global_step == 4
    lines = [ln for ln in log_stream.getvalue().splitlines() if "distill.progress" in ln]
    steps = [ln for ln in lines if " step " in ln and "samples/s" in ln and "validation" not in ln]
    assert len(steps) == 2, lines  # steps 2 and 4 (every 2 optimizer steps, not every batch)
    assert "step 2/4 (50%)" in steps[0] and "step 4/4 (100%)" in steps[1]
    for ln in steps:
        assert "loss " in ln and "lr 0.05" in ln and "ETA " in ln and "elapsed " in ln
    assert any("validation at step 2" in ln and "val/mse" in ln for ln in lines)
    assert any("trained 4 steps" in ln for ln in lines)
    assert console.getvalue() == ""  # nothing drawn on the console itself


def test_time_interval_also_triggers_a_line(tmp_path, log_stream):
    callbacks, bar = progress_callbacks(True, stream=io.StringIO(), every_n_steps=1000, every_seconds=0.0)
    _fit(tmp_path, callbacks, bar, max_steps=3)
    lines = [ln for ln in log_stream.getvalue().splitlines() if "samples/s" in ln and "trained" not in ln]
    assert [ln.split("step ")[1].split("/")[0] for ln in lines] == ["1", "2", "3"]


def test_quiet_hides_progress_lines(tmp_path):
    stream = io.StringIO()
    configure_logging(-1, stream=stream)
    try:
        callbacks, bar = progress_callbacks(True, stream=io.StringIO(), every_n_steps=1)
        _fit(tmp_path, callbacks, bar, max_steps=2)
    finally:
        reset_logging()
    assert "samples/s" not in stream.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_bar_labelled_in_optimizer_steps(tmp_path):
    console = _Terminal()
    callbacks, bar = progress_callbacks(True, stream=console)
    assert bar is True and [type(c) for c in callbacks] == [StepProgressBar]
    try:
        _fit(tmp_path, callbacks, bar)
    finally:
        rich.reconfigure()  # Lightning reconfigures Rich's global console to our stream
    drawn = console.getvalue()
    assert "Training" in drawn and "4/4" in drawn
    assert "Epoch 0/-2" not in drawn and "8/4" not in drawn  # Lightning's label and its batch count


def test_disabled_gives_nothing_and_durations_read_well():
    assert progress_callbacks(False) == ([], False)
    assert [format_duration(s) for s in (4.2, 75.2, 7260, float("inf"))] == ["4s", "1m15s", "2h01m", "?"]
    with pytest.raises(ValueError):
        ProgressLog(every_n_steps=0)
    logging.getLogger("distill.progress").debug("unused")  # the module's logger is ours (distill.*)
