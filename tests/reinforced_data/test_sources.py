"""Input sources: tar specs, image folders with CSV/JSONL captions, split files, the corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mcd_common.errors import UsageError
from reinforced_data.sources import check_caption, index_shard, iter_samples, load_captions, resolve_inputs

FLICKR = Path("/work/shared/data/flickr8k")


def _folder(tmp_path: Path, image_bytes) -> Path:
    """flickr8k-style root: images/ + captions.csv (several rows per image) + splits/train.txt."""
    root = tmp_path / "flickr"
    (root / "images").mkdir(parents=True)
    for k in range(5):
        (root / "images" / f"img_{k}.v2.jpg").write_bytes(image_bytes(seed=k))
    rows = ["image,caption"]
    for k in (3, 0, 1, 2, 4):  # unsorted on purpose
        rows += [f"img_{k}.v2.jpg,a photo number {k}", f'img_{k}.v2.jpg,"another, with a comma {k}"']
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("img_0.v2.jpg\nimg_2.v2.jpg\nimg_3.v2.jpg\nimg_4.v2.jpg\n")
    return root


def test_folder_with_csv_and_split(tmp_path: Path, image_bytes):
    root = _folder(tmp_path, image_bytes)
    shards = resolve_inputs(root, split_file=root / "splits" / "train.txt", shard_size=3)
    assert [s.kind for s in shards] == ["folder", "folder"]
    assert [len(s.items) for s in shards] == [3, 1]
    names = [it.image for s in shards for it in s.items]
    assert names == ["img_0.v2.jpg", "img_2.v2.jpg", "img_3.v2.jpg", "img_4.v2.jpg"]  # sorted, split applied
    samples = [s for shard in shards for s in iter_samples(shard)]
    assert [s.uid for s in samples] == ["img_0_v2", "img_2_v2", "img_3_v2", "img_4_v2"]  # no dots in keys
    assert samples[0].caption == "a photo number 0"
    assert samples[0].captions == ["a photo number 0", "another, with a comma 0"]
    assert samples[0].image == (root / "images" / "img_0.v2.jpg").read_bytes()
    # explicit images dir + captions file gives the same shards
    again = resolve_inputs(
        root / "images", captions=root / "captions.csv", split_file=root / "splits" / "train.txt", shard_size=3
    )
    assert [it.image for s in again for it in s.items] == names


def test_jsonl_captions_and_missing_image(tmp_path: Path, image_bytes):
    (tmp_path / "a.png").write_bytes(image_bytes(fmt="PNG"))
    lines = [{"file_name": "a.png", "caption": ["one", "two"]}, {"image": "gone.jpg", "text": "three"}]
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert load_captions(tmp_path / "caps.jsonl") == {"a.png": ["one", "two"], "gone.jpg": ["three"]}
    shards = resolve_inputs(tmp_path, captions=tmp_path / "caps.jsonl")
    samples = list(iter_samples(shards[0]))
    assert samples[0].captions == ["one", "two"] and samples[0].error is None
    assert samples[1].error == "missing_image" and samples[1].image is None


def test_non_utf8_caption_in_csv_is_flagged_not_fatal(tmp_path: Path):
    (tmp_path / "c.csv").write_bytes(b"image,caption\nx.jpg,caf\xe9 latin-1\ny.jpg,fine\n")
    table = load_captions(tmp_path / "c.csv")
    assert check_caption(table["x.jpg"][0])[0] == "caption_not_utf8"
    assert check_caption(table["y.jpg"][0]) == (None, "fine")
    assert check_caption(b"\xff\xfe")[0] == "caption_not_utf8"
    assert check_caption("  \n ")[0] == "empty_caption"
    assert check_caption(None)[0] == "no_caption"


def test_tar_specs(tmp_path: Path, write_tar, image_bytes):
    for s in range(3):
        write_tar(
            tmp_path / f"part-{s:05d}.tar",
            [{"__key__": f"{s:05d}{k:04d}", "jpg": image_bytes(seed=k), "txt": f"cap {s} {k}"} for k in range(2)],
        )
    brace = resolve_inputs(str(tmp_path / "part-{00000..00002}.tar"))
    assert [Path(s.path).name for s in brace] == ["part-00000.tar", "part-00001.tar", "part-00002.tar"]
    assert [s.index for s in brace] == [0, 1, 2]
    assert [s.path for s in resolve_inputs(tmp_path)] == [s.path for s in brace]  # a directory of tars
    joined = resolve_inputs(f"{tmp_path}/part-00002.tar::{tmp_path}/part-00000.tar")
    assert [Path(s.path).name for s in joined] == ["part-00002.tar", "part-00000.tar"]
    refs = index_shard(brace[1])
    assert [r.key for r in refs] == ["000010000", "000010001"]
    assert [s.caption for s in iter_samples(brace[1])] == ["cap 1 0", "cap 1 1"]
    with pytest.raises(UsageError, match="not found"):
        resolve_inputs(str(tmp_path / "nope-{0..1}.tar"))


def test_img2dataset_style_members(tmp_path: Path, write_tar, image_bytes):
    meta = {"caption": "from json", "url": "http://x/y.png", "key": "000000000", "width": 40}
    write_tar(tmp_path / "s.tar", [{"__key__": "000000000", "png": image_bytes(fmt="PNG"), "json": json.dumps(meta)}])
    (sample,) = iter_samples(resolve_inputs(tmp_path / "s.tar")[0])
    assert sample.caption == "from json" and sample.url == "http://x/y.png" and sample.meta["width"] == 40
    assert sample.image[:4] == b"\x89PNG"


def test_folder_without_captions_is_an_error(tmp_path: Path, image_bytes):
    (tmp_path / "a.jpg").write_bytes(image_bytes())
    with pytest.raises(UsageError, match="--data.captions"):
        resolve_inputs(tmp_path)


def test_corpus_default(corpus: Path):
    shards = resolve_inputs(None, corpus_dir=corpus)  # idempotent: the fixture's corpus is reused as is
    assert len(shards) == 3
    first = next(iter_samples(shards[0]))
    assert first.uid == "shapes-train-00000000" and len(first.captions) == 5 and first.caption == first.captions[0]


@pytest.mark.skipif(not FLICKR.is_dir(), reason="flickr8k is not on this machine")
def test_real_flickr8k_layout_resolves_as_is():
    shards = resolve_inputs(FLICKR, split_file=FLICKR / "splits" / "train.txt", shard_size=1000)
    assert len(shards) == 6 and sum(len(s.items) for s in shards) == 6000
    assert all(len(it.captions) == 5 for it in shards[0].items)
    assert (Path(shards[0].path) / shards[0].items[0].image).is_file()
