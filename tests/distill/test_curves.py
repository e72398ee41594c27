"""`distill.curves`: the learning-curve PNG of a real tiny `distill train` run, drawn from its metrics.csv."""

import pytest
from PIL import Image

from distill.cli import main
from distill.curves import panel_of, plot_learning_curves, read_metrics
from mcd_common import UsageError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("run")
    args = ["train", "--student", "test_tiny", "--data.path", str(tiny_corpus / "train"), "--data.batch_size", "16"]
    args += ["--data.num_workers", "0", "--trainer.max_steps", "4", "--trainer.default_root_dir", str(root)]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]
    args += ["--trainer.val_check_interval", "2", "--val.zeroshot", str(tiny_corpus / "zeroshot")]
    args += ["--val.retrieval", str(tiny_corpus / "val")]
    assert main(args) == 0
    return root


def test_reads_lightning_csv_layout(run_dir):
    series = read_metrics(run_dir / "logs" / "metrics.csv")
    assert [s for s, _ in series["train/loss"]] == [0, 1, 2, 3]
    assert "train/contrastive_loss" in series and any(name.startswith("lr-") for name in series)
    assert [s for s, _ in series["val/zeroshot_top1"]] == [1, 3]  # after steps 2 and 4 (CSV rows are 0-based)
    assert "epoch" not in series and "step" not in series
    assert {panel_of(n) for n in series} >= {"loss", "validation", "learning rate"}


def test_plot_writes_png_beside_the_csv(run_dir):
    png = plot_learning_curves(run_dir / "logs" / "metrics.csv")
    assert png == run_dir / "logs" / "curves.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width == 770 and im.height > 3 * 250  # three panels at 110 dpi
    assert not [p for p in png.parent.iterdir() if ".tmp-" in p.name]


def test_empty_and_missing_csvs(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/logit_scale\n0,0,14.2\n")
    assert plot_learning_curves(csv) is None and not (tmp_path / "curves.png").exists()
    with pytest.raises(UsageError, match="no such metrics file"):
        read_metrics(tmp_path / "nope.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="no 'step' column"):
        read_metrics(tmp_path / "other.csv")
