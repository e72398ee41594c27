"""Training data on bad input: reinforced-looking data without records, mismatched teach.json widths, damaged JSON,
and the counted skips `DistillDataModule.data_stats()` hands to run.json (issue 9)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from distill.args import DataArgs, EvalArgs
from distill.data import DistillDataModule, resolve_data
from mcd_common.errors import UsageError
from reinforced_data import BuildArgs, InputArgs, build_data
from reinforced_data._io import TarShardWriter, decode_npz, encode_npz
from students import create_student


@pytest.fixture(scope="module")
def reinforced(tmp_path_factory, tiny_corpus) -> Path:
    """A 16-sample reinforced dataset of the tiny corpus's val split (test_tiny teacher, width 32)."""
    out = tmp_path_factory.mktemp("rd") / "ds"
    spec = str(tiny_corpus / "val" / "shapes-val-000000.tar")
    build_data(
        out=out,
        data=InputArgs(path=spec),
        teacher="test_tiny",
        build=BuildArgs(num_augs=2, num_workers=0, progress=False),
    )
    return out


def _samples(shard: Path) -> list[tuple[str, dict[str, bytes]]]:
    out: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(shard) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = tar.extractfile(m).read()
    return out


def _rewrite(root: Path, edit) -> None:
    """Rewrite shard 0 of a dataset copy with `edit(n, members) -> members | None` (None drops the sample)."""
    shard = root / "00000000.tar"
    samples = _samples(shard)
    writer = TarShardWriter(shard)
    for n, (key, m) in enumerate(samples):
        new = edit(n, dict(m))
        if new is not None:
            writer.write(key, new)
    writer.close()


def test_reinforced_data_without_paug_json_is_an_error_not_plain_data(tmp_path, reinforced):
    """It used to be read as plain image-caption data: `--mode auto` then trained from scratch, silently."""
    root = tmp_path / "ds"
    shutil.copytree(reinforced, root)
    _rewrite(root, lambda n, m: {k: v for k, v in m.items() if k != "paug.json"})
    with pytest.raises(UsageError, match=r"looks like reinforced data .* no paug\.json"):
        resolve_data(DataArgs(path=str(root)))


def test_teach_json_dims_are_checked_against_the_stored_width(tmp_path, reinforced):
    root = tmp_path / "ds"
    shutil.copytree(reinforced, root)
    teach = json.loads((root / "teach.json").read_text())
    teach["teachers"][0]["dim"] = 48
    (root / "teach.json").write_text(json.dumps(teach))
    with pytest.raises(UsageError, match=r"stored embeddings are 32 wide, but teach.json's teachers .*48"):
        resolve_data(DataArgs(path=str(root)))


def test_damaged_teach_and_config_json_are_usage_errors(tmp_path, reinforced):
    root = tmp_path / "ds"
    shutil.copytree(reinforced, root)
    (root / "teach.json").write_text("{not json")
    with pytest.raises(UsageError, match="teach.json: not readable JSON"):
        resolve_data(DataArgs(path=str(root)))
    shutil.copy(reinforced / "teach.json", root / "teach.json")
    (root / "config.json").write_text("[1, 2")
    with pytest.raises(UsageError, match="config.json"):
        resolve_data(DataArgs(path=str(root)))


def test_data_stats_count_the_samples_left_out(tmp_path, reinforced):
    root = tmp_path / "ds"
    shutil.copytree(reinforced, root)

    def edit(n: int, m: dict[str, bytes]) -> dict[str, bytes]:
        if n in (3, 7):  # Apple's generator's empty arrays
            arrays = decode_npz(m["npz"])
            m["npz"] = encode_npz({k: v[:0] for k, v in arrays.items()})
        return m

    _rewrite(root, edit)
    spec = resolve_data(DataArgs(path=str(root)))
    student = create_student("test_tiny")
    dm = DistillDataModule(
        spec, DataArgs(path=str(root), batch_size=4, num_workers=0), student, mode="reinforced", seed=0, val=EvalArgs()
    )
    assert dm.data_stats() is None
    dm.setup("fit")
    stats = dm.data_stats()
    assert stats["samples_indexed"] == 16 and stats["samples_usable"] == 14
    assert stats["skipped"] == {"empty_embeddings": 2} and stats["replaced_at_load"] == 0
    assert len(dm._train) == 14
