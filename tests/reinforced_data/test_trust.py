"""build-data on reruns and bad input: one identity per dataset, failed inputs counted not fatal, one duplicate
rule, captions files read safely, `--out` checked first (issue 9)."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from distill.cli import main
from mcd_common.errors import UsageError
from reinforced_data import BuildArgs, InputArgs, build_data, verify_dataset
from reinforced_data.sources import InputStats, load_captions

KW = dict(num_augs=2, batch_size=4, num_workers=0, progress=False)


def _folder(root: Path, image_bytes, n: int = 6) -> Path:
    """A flickr8k-like root: images/, captions.csv, splits/{train,test}.txt."""
    (root / "images").mkdir(parents=True)
    (root / "splits").mkdir()
    rows = ["image,caption"]
    for k in range(n):
        (root / "images" / f"{k}.jpg").write_bytes(image_bytes(seed=k))
        rows.append(f"{k}.jpg,caption number {k}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "splits" / "train.txt").write_text("".join(f"{k}.jpg\n" for k in range(n - 2)))
    (root / "splits" / "test.txt").write_text("".join(f"{k}.jpg\n" for k in range(n - 2, n)))
    return root


def _save_tiny_teacher(path: Path, seed: int) -> Path:
    """Random weights for the `test_tiny` teacher (open_clip `test-tiny-clip`), as a local safetensors file."""
    import open_clip
    from safetensors.torch import save_file

    from teachers._open_clip_loader import add_tiny_model_configs

    add_tiny_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model("test-tiny-clip")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_changed_shard_size_and_split_file_are_refused_and_overwrite_rebuilds(tmp_path, image_bytes):
    """Resuming with another shard size lost samples, and another split file wrote nothing and kept the old split,
    both silently; now the rerun is refused naming the key (old -> new), and --overwrite rebuilds."""
    root = _folder(tmp_path / "flickr", image_bytes)
    out = tmp_path / "ds"
    train = root / "splits" / "train.txt"
    first = build_data(
        out=out,
        data=InputArgs(path=str(root), split_file=train),
        teacher="test_tiny",
        build=BuildArgs(**KW, shard_size=3),
    )
    assert first["written"] == 4 and first["dataset_complete"]
    with pytest.raises(UsageError, match=r"build\.shard_size: 3 -> 2.*--overwrite"):
        build_data(
            out=out,
            data=InputArgs(path=str(root), split_file=train),
            teacher="test_tiny",
            build=BuildArgs(**KW, shard_size=2),
        )
    train.write_text("0.jpg\n1.jpg\n")  # same file name, other contents
    with pytest.raises(UsageError, match=r"build\.split_file_sha256"):
        build_data(
            out=out,
            data=InputArgs(path=str(root), split_file=train),
            teacher="test_tiny",
            build=BuildArgs(**KW, shard_size=3),
        )
    again = build_data(
        out=out,
        data=InputArgs(path=str(root), split_file=train),
        teacher="test_tiny",
        build=BuildArgs(**KW, shard_size=3),
        overwrite=True,
    )
    assert again["written"] == 2 and again["shards_resumed"] == 0 and again["dataset_complete"]
    assert verify_dataset(out)["ok"] and len(list(out.glob("*.tar"))) == 1  # the old second shard is gone


def test_other_teacher_weights_are_refused(tmp_path, corpus):
    """`--teacher_weights` was not in the fingerprint: a rerun resumed and mixed two weight files' embeddings."""
    spec = str(corpus / "train" / "shapes-train-000002.tar")
    w1, w2 = _save_tiny_teacher(tmp_path / "a.safetensors", 1), _save_tiny_teacher(tmp_path / "b.safetensors", 2)
    out = tmp_path / "ds"
    build_data(out=out, data=InputArgs(path=spec), teacher="test_tiny", teacher_weights=w1, build=BuildArgs(**KW))
    with pytest.raises(UsageError, match=r"build\.teacher_weights_sha256\.test_tiny: \"[0-9a-f]+\.\.\."):
        build_data(out=out, data=InputArgs(path=spec), teacher="test_tiny", teacher_weights=w2, build=BuildArgs(**KW))
    teach = json.loads((out / "teach.json").read_text())
    assert len(teach["teachers"][0]["weights_sha256"]) == 64  # the weights' identity travels with the data
    resumed = build_data(
        out=out, data=InputArgs(path=spec), teacher="test_tiny", teacher_weights=w1, build=BuildArgs(**KW)
    )
    assert resumed["shards_resumed"] == 1 and resumed["written"] == 0


def test_a_changed_input_tar_rebuilds_its_shard(tmp_path, corpus, write_tar, image_bytes):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    shutil.copy(corpus / "train" / "shapes-train-000002.tar", a)
    write_tar(b, [{"__key__": "x", "jpg": image_bytes(seed=3), "txt": "one photo"}])
    out = tmp_path / "ds"
    build_data(out=out, data=InputArgs(path=f"{a}::{b}"), teacher="test_tiny", build=BuildArgs(**KW))
    write_tar(b, [{"__key__": "y", "jpg": image_bytes(seed=4), "txt": "another photo"}])
    rerun = build_data(out=out, data=InputArgs(path=f"{a}::{b}"), teacher="test_tiny", build=BuildArgs(**KW))
    assert rerun["shards_resumed"] == 1 and rerun["shards_done"] == 1 and rerun["written"] == 1
    assert verify_dataset(out)["ok"]


def test_damaged_config_json_is_a_usage_error(tmp_path, corpus):
    spec = str(corpus / "train" / "shapes-train-000002.tar")
    out = tmp_path / "ds"
    build_data(out=out, data=InputArgs(path=spec), teacher="test_tiny", build=BuildArgs(**KW))
    (out / "config.json").write_text('{"model_name": "x", "buil')
    with pytest.raises(UsageError, match="config.json is not valid JSON.*--overwrite"):
        build_data(out=out, data=InputArgs(path=spec), teacher="test_tiny", build=BuildArgs(**KW))
    assert build_data(out=out, data=InputArgs(path=spec), teacher="test_tiny", build=BuildArgs(**KW), overwrite=True)[
        "ok"
    ]
    assert verify_dataset(out)["ok"]


def test_unreadable_input_shards_fail_alone_and_a_rerun_retries_only_them(tmp_path, corpus, capsys):
    """One bad tar killed the whole build with a raw tarfile.ReadError naming no file."""
    good = corpus / "train" / "shapes-train-000002.tar"  # 4 samples
    inputs = [tmp_path / f"in{k}.tar" for k in range(5)]
    shutil.copy(good, inputs[0])
    inputs[1].write_bytes(b"")  # 0 bytes
    inputs[2].write_bytes(good.read_bytes()[:3000])  # truncated mid-member
    inputs[3].write_bytes(b"this is not a tar file\n" * 40)
    shutil.copy(corpus / "train" / "shapes-train-000001.tar", inputs[4])
    out = tmp_path / "ds"
    spec = "::".join(str(p) for p in inputs)
    argv = ["build-data", "--out", str(out), "--input", spec, "--teacher", "test_tiny"]
    argv += ["--build.num_augs", "2", "--build.num_workers", "0", "--build.progress", "false"]
    assert main(argv) == 1  # partial: non-zero
    summary = json.loads(capsys.readouterr().out)
    assert not summary["ok"] and summary["shards_failed"] == 3 and summary["shards_done"] == 2
    assert summary["written"] == 14 and not summary["dataset_complete"]
    failed = {f["input"]: f["error"] for f in summary["failed_inputs"]}
    assert set(failed) == {str(p) for p in inputs[1:4]}
    assert all(err.startswith(name) for name, err in failed.items())  # each message names its file
    assert "truncated" in failed[str(inputs[2])] or "unexpected end" in failed[str(inputs[2])]
    progress = json.loads((out / "progress.json").read_text())
    assert [f["shard"] for f in progress["failed_inputs"]] == ["00000001.tar", "00000002.tar", "00000003.tar"]
    problems = verify_dataset(out)["problems"]
    assert any("00000002.tar: input" in p and "could not be read" in p for p in problems)

    for p in inputs[1:4]:
        shutil.copy(good, p)
    # the same uids now appear in several inputs: the first input keeps them, later copies are duplicates
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["shards_done"] == 3 and summary["shards_resumed"] == 2
    assert summary["skipped"] == {"duplicate_uid": 12} and summary["dataset_complete"]
    assert json.loads((out / "progress.json").read_text())["failed_inputs"] == []
    assert verify_dataset(out)["ok"]


def test_duplicate_keys_in_one_tar_and_across_tars_keep_the_first(tmp_path, write_tar, image_bytes):
    """Duplicates across tars were written twice and then failed the tool's own --verify."""
    img = [image_bytes(seed=k) for k in range(4)]
    a = write_tar(
        tmp_path / "a.tar",
        [
            {"__key__": "u1", "jpg": img[0], "txt": "first u1"},
            {"__key__": "u2", "jpg": img[1], "txt": "first u2"},
            {"__key__": "u1", "jpg": img[2], "txt": "u1 again, same tar"},
        ],
    )
    b = write_tar(
        tmp_path / "b.tar",
        [{"__key__": "u2", "jpg": img[3], "txt": "u2 again, other tar"}, {"__key__": "u3", "jpg": img[3], "txt": "u3"}],
    )
    out = tmp_path / "ds"
    summary = build_data(out=out, data=InputArgs(path=f"{a}::{b}"), teacher="test_tiny", build=BuildArgs(**KW))
    assert summary["written"] == 3 and summary["skipped"] == {"duplicate_uid": 2}
    report = verify_dataset(out)
    assert report["ok"], report["problems"]
    texts = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            texts.update({m.name: tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")})
    assert texts == {"u1.txt": "first u1", "u2.txt": "first u2", "u3.txt": "u3"}
    side = json.loads((out / "_progress" / "00000001.tar.json").read_text())
    assert side["skipped_uids"] == [["u2", "duplicate_uid"]]


def test_captions_file_rows_are_counted_and_paths_kept_inside(tmp_path, image_bytes):
    root = tmp_path / "imgs"
    root.mkdir()
    for k in range(3):
        (root / f"{k}.jpg").write_bytes(image_bytes(seed=k))
    (tmp_path / "secret.jpg").write_bytes(image_bytes(seed=9))
    rows = [
        "image,caption",
        "0.jpg,a red square",
        "1.jpg,",  # no caption
        "../secret.jpg,escapes the folder",
        f"{tmp_path / 'secret.jpg'},absolute path",
        "2.jpg,a blue circle",
        "2.jpg",  # short row
    ]
    # NOTE: a spreadsheet export starts with a UTF-8 byte-order mark; the header was then not found
    (tmp_path / "caps.csv").write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(rows) + "\r\n").encode())
    stats = InputStats()
    table = load_captions(tmp_path / "caps.csv", stats)
    assert table == {"0.jpg": ["a red square"], "2.jpg": ["a blue circle"]}
    assert stats.rows_skipped == {"no_caption": 2, "unsafe_path": 2}
    out = tmp_path / "ds"
    summary = build_data(
        out=out,
        data=InputArgs(path=str(root), captions=tmp_path / "caps.csv"),
        teacher="test_tiny",
        build=BuildArgs(**KW),
    )
    assert summary["written"] == 2 and summary["caption_rows_skipped"] == {"no_caption": 2, "unsafe_path": 2}

    lines = [
        json.dumps({"image": "0.jpg", "caption": "ok"}),
        "not json at all",
        json.dumps({"image": "1.jpg"}),
        json.dumps({"image": "/etc/passwd", "caption": "absolute"}),
        json.dumps({"image": "2.jpg", "caption": ["", "a list one"]}),
    ]
    (tmp_path / "caps.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode())
    stats = InputStats()
    assert load_captions(tmp_path / "caps.jsonl", stats) == {"0.jpg": ["ok"], "2.jpg": ["a list one"]}
    assert stats.rows_skipped == {"not_json": 1, "no_caption": 1, "unsafe_path": 1}


def test_out_that_is_a_file_fails_in_one_line_before_any_model(tmp_path, capsys):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    # an unknown teacher would fail when models load: the --out error must come first
    code = main(["build-data", "--out", str(target), "--teacher", "no_such_teacher_xyz"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--out" in err[0] and "is a file" in err[0]
    with pytest.raises(UsageError, match="is a file, not a directory"):
        build_data(out=target / "sub", teacher="test_tiny")


def test_out_holding_the_inputs_is_refused(tmp_path, corpus):
    shutil.copy(corpus / "train" / "shapes-train-000002.tar", tmp_path / "00000000.tar")
    with pytest.raises(UsageError, match="holds the input shard 00000000.tar"):
        build_data(
            out=tmp_path,
            data=InputArgs(path=str(tmp_path / "00000000.tar")),
            teacher="test_tiny",
            build=BuildArgs(**KW),
        )


def test_overwrite_refuses_while_another_build_is_running(tmp_path, corpus):
    from mcd_common.files import FileLock

    spec = str(corpus / "train" / "shapes-train-000002.tar")
    out = tmp_path / "ds"
    build_data(out=out, data=InputArgs(path=spec), teacher="test_tiny", build=BuildArgs(**KW))
    running = FileLock(out / "_progress" / "locks" / "build.lock", shared=True).acquire()  # what a build holds
    try:
        with pytest.raises(UsageError, match="another build-data process is writing"):
            build_data(out=out, data=InputArgs(path=spec), teacher="test_tiny", build=BuildArgs(**KW), overwrite=True)
        assert (out / "00000000.tar").is_file()  # nothing was deleted
        resumed = build_data(
            out=out, data=InputArgs(path=spec), teacher="test_tiny", build=BuildArgs(**KW)
        )  # builds share it
        assert resumed["shards_resumed"] == 1
    finally:
        running.release()
