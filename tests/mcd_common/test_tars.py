"""The one tar grouping rule: webdataset's samples on well-formed tars, duplicates reported, offsets exact."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from mcd_common.tars import TarReader, TarStats, index_tar, iter_tar_samples, split_member_name


def _write(path: Path, members: list[tuple[str, bytes | None]], mode: str = "w") -> Path:
    """A tar with `(name, data)` members in order; `data=None` writes a directory entry."""
    with tarfile.open(path, mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


WELL_FORMED = [
    ("__info__", b"meta"),
    ("sub", None),
    ("sub/000.jpg", b"img0"),
    ("sub/000.TXT", b"cap0"),
    ("sub/000.syn.json", b"{}"),
    ("README", b"no extension"),
    ("001.jpg", b"img1"),
    ("001.txt", b"cap1"),
    ("__meta__/x.json", b"skipped too"),
    ("002.v2.png", b"img2"),
]


def test_split_member_name_is_base_plus_ext():
    assert split_member_name("a/b.c.JPG") == ("a/b", "c.jpg")
    assert split_member_name("a.b/c.txt") == ("a.b/c", "txt")  # dots in directories do not split
    assert split_member_name("noext") is None
    assert split_member_name("__key__") is None and split_member_name("__x__/y.json") is None


def test_samples_equal_webdatasets_on_a_well_formed_tar(tmp_path: Path):
    path = _write(tmp_path / "a.tar", WELL_FORMED)
    ours = [(s.key, s.members) for s in iter_tar_samples(path)]
    theirs = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.tarfile_to_samples()([{"url": str(path)}])
    ]
    assert ours == theirs
    assert [k for k, _ in ours] == ["sub/000", "001", "002"]
    assert ours[0][1] == {"jpg": b"img0", "txt": b"cap0", "syn.json": b"{}"}


def test_duplicates_are_reported_never_merged(tmp_path: Path):
    path = _write(
        tmp_path / "dup.tar",
        [
            ("a.jpg", b"a1"),
            ("a.txt", b"t1"),
            ("a.jpg", b"a2"),  # repeated key.ext in one run: webdataset raises, we start a second sample
            ("b.jpg", b"b1"),
            ("a.jpg", b"a3"),  # key seen before, not consecutive
        ],
    )
    stats, seen = TarStats(), []
    samples = list(iter_tar_samples(path, stats=stats, on_duplicate=seen.append))
    assert [(s.key, s.members) for s in samples] == [
        ("a", {"jpg": b"a1", "txt": b"t1"}),
        ("a", {"jpg": b"a2"}),
        ("b", {"jpg": b"b1"}),
        ("a", {"jpg": b"a3"}),
    ]
    assert stats.samples == 4 and stats.duplicates == 2 and stats.duplicate_keys == ["a", "a"] and seen == ["a", "a"]
    index_stats = TarStats()
    assert [s.key for s in index_tar(path, stats=index_stats)] == ["a", "a", "b", "a"]
    assert index_stats.duplicates == 2
    with pytest.raises(ValueError, match="duplicate file name"):
        list(wds.tarfile_to_samples()([{"url": str(path)}]))


def test_index_offsets_read_the_streamed_bytes(tmp_path: Path):
    members = [(f"{k:05d}.{ext}", f"{k}-{ext}".encode() * (k + 1)) for k in range(300) for ext in ("jpg", "json")]
    path = _write(tmp_path / "big.tar", [("__index__", b"x"), *members])
    stats = TarStats()
    index = index_tar(path, stats=stats)
    assert len(index) == 300 and stats.skipped_members == 1 and stats.duplicates == 0
    streamed = list(iter_tar_samples(path))
    with TarReader() as reader:
        for ref, sample in zip(index, streamed, strict=True):
            assert ref.key == sample.key
            assert reader.read_sample(path, ref) == sample.members
        assert reader.read_sample(path, index[7], exts=("json",)) == {"json": streamed[7].members["json"]}


def test_reader_is_picklable_and_reopens_in_another_process(tmp_path: Path):
    path = _write(tmp_path / "a.tar", WELL_FORMED)
    ref = index_tar(path)[1]
    reader = TarReader()
    assert reader.read_sample(path, ref) == {"jpg": b"img1", "txt": b"cap1"}
    clone = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker receives
    assert clone._handles == {} and clone.read_sample(path, ref)["jpg"] == b"img1"
    parent = reader._handles[str(path)]
    reader._pid = -1  # as seen from a forked child: the inherited handle must not be reused
    assert reader.read_sample(path, ref)["txt"] == b"cap1" and reader._handles[str(path)] is not parent
    reader.close()
    clone.close()
    parent.close()


def test_streams_compressed_tars_and_open_files(tmp_path: Path):
    path = _write(tmp_path / "a.tar.gz", WELL_FORMED, mode="w:gz")
    assert [s.key for s in iter_tar_samples(path)] == ["sub/000", "001", "002"]
    with open(path, "rb") as f:
        assert [s.key for s in iter_tar_samples(f)] == ["sub/000", "001", "002"]


@pytest.mark.parametrize("cut", ["empty", "mid_header", "mid_member", "before_header", "not_a_tar"])
def test_unreadable_tars_raise_an_error_naming_the_file(tmp_path, cut):
    from mcd_common.tars import TarFileError

    good = _write(tmp_path / "good.tar", [(f"{k:03d}.jpg", bytes(range(256)) * 8) for k in range(3)])
    raw = good.read_bytes()
    member = 512 + 2048  # one header block + the member's data
    data = {
        "empty": b"",
        "mid_header": raw[: member + 100],
        "mid_member": raw[: member + 700],
        "before_header": raw[:member],  # tarfile alone stops quietly here and loses the last two samples
        "not_a_tar": b"plain text, not a tar\n" * 50,
    }[cut]
    bad = tmp_path / f"{cut}.tar"
    bad.write_bytes(data)
    with pytest.raises(TarFileError, match=f"^{bad}: "):
        index_tar(bad)
    # NOTE: streaming (verify, which also checks each shard's sha256) cannot tell a tar cut at a header from a
    # shorter one; random access checks for the end-of-archive block.
    if cut not in ("before_header", "mid_header"):
        with pytest.raises(TarFileError, match=f"^{bad}: "):
            list(iter_tar_samples(bad))
    assert len(index_tar(good)) == 3
