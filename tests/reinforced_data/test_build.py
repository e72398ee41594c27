"""build-data: every stored embedding against a direct teacher call, bit-exact views, ranks/workers, bad inputs,
folders with several captions, captioners, verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mcd_common.files import FileLock, sha256_bytes
from mcd_common.images import decode_image, to_uint8_tensor
from reinforced_data import BuildArgs, build_data, dist_env, verify_dataset
from reinforced_data._io import decode_npz
from reinforced_data.augment import AugmentCfg, decode_param_aug, replay
from reinforced_data.build import InputArgs, _Task, _ViewDataset
from reinforced_data.schema import teacher_slices
from reinforced_data.sources import index_shard, resolve_inputs

ATOL = 2e-3  # float16 storage of unit vectors


def _direct_texts(ens, texts: list[str]) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([ens[n].encode_texts(texts) for n in ens.names], dim=1).numpy()


def test_every_sample_matches_a_direct_teacher_call(built, tiny_ensemble, dataset_samples):
    out, summary = built
    assert summary["written"] == 24 and summary["shards_done"] == 3 and summary["skipped"] == {}
    assert summary["dataset_complete"] and summary["dataset_samples"] == 24
    samples = dataset_samples(out)
    assert len(samples) == 24  # every sample of every batch, including those past the first batch of a shard
    teach = json.loads((out / "teach.json").read_text())
    assert [t["name"] for t in teach["teachers"]] == ["test_tiny", "test_tiny_b"]
    assert [t["dim"] for t in teach["teachers"]] == [32, 48]
    slices = teacher_slices(teach["teachers"])
    for uid, m in samples.items():
        meta = json.loads(m["json"])
        assert meta["uid"] == uid and meta["sha256"] == sha256_bytes(m["jpg"])
        img = decode_image(m["jpg"])
        records = decode_param_aug(m["paug.json"])
        arrays = decode_npz(m["npz"])
        assert arrays["image_emb"].dtype == np.float16 and arrays["image_emb"].shape == (3, 80)
        assert arrays["text_emb"].shape == (1, 80)
        with torch.inference_mode():
            for name, member in tiny_ensemble.items():
                views = torch.stack([to_uint8_tensor(replay(img, r, member.image_size)) for r in records])
                expected = member.encode_image(views).numpy()
                got = arrays["image_emb"][:, slices[name]].astype(np.float32)
                np.testing.assert_allclose(got, expected, atol=ATOL, err_msg=f"{uid} {name}")
                # each teacher's slice is unit norm on its own
                np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=ATOL)
        caption = m["txt"].decode()
        np.testing.assert_allclose(
            arrays["text_emb"].astype(np.float32), _direct_texts(tiny_ensemble, [caption]), atol=ATOL
        )
        # the corpus has 5 captions per image: the other 4 are stored as alt_text with their embeddings
        syn = json.loads(m["syn.json"])
        alt = syn["alt_text"]
        assert len(alt) == 4 and caption not in alt
        np.testing.assert_allclose(
            arrays["alt_text_emb"].astype(np.float32), _direct_texts(tiny_ensemble, alt), atol=ATOL
        )
        # no captioner: the real caption is the placeholder Apple's loader needs, with the text_emb row itself
        assert syn["syn_text_gt"] == [caption]
        np.testing.assert_array_equal(arrays["syn_text_gt_emb"], arrays["text_emb"])


def test_builder_views_are_the_replayed_views(built, corpus_spec, shard_reader):
    """The pixels each teacher embedded == replay(original bytes, stored record) at that teacher's size."""
    out, _ = built
    teach = json.loads((out / "teach.json").read_text())
    aug = AugmentCfg(crop_size=teach["aug_crop"])
    shard = resolve_inputs(corpus_spec)[1]
    refs = tuple(index_shard(shard))
    dataset = _ViewDataset(aug, 3, 0, (32, 48), (), None, True)
    batch = dataset[_Task(shard.index, shard.kind, shard.path, 0, 1, refs)]
    stored = shard_reader(out / "00000001.tar")
    assert [s.uid for s in batch.samples] == [k for k, _ in stored]
    for n, (_, m) in enumerate(stored):
        img = decode_image(m["jpg"])
        records = decode_param_aug(m["paug.json"])
        assert records == batch.samples[n].records
        for size in (32, 48):
            replayed = torch.stack([to_uint8_tensor(replay(img, r, size)) for r in records])
            assert torch.equal(batch.views[size][3 * n : 3 * n + 3], replayed)
        for size in (20, 64):  # any other output size works from the same records
            assert replay(img, records[0], size).size == (size, size)


def test_ranks_and_worker_count_reproduce_the_single_run(tmp_path, corpus_spec, built, build_kw, monkeypatch):
    out = tmp_path / "ds"
    summaries = []
    # rank 1 first, with DataLoader workers, while "rank 0" holds the locks of its shards 0 and 2 (a process holds
    # a shard's lock while it writes it); then rank 0 in-process: the union must equal the single-rank build.
    busy = [FileLock(out / "_progress" / "locks" / f"0000000{k}.tar.lock").acquire() for k in (0, 2)]
    for rank, workers in ((1, 2), (0, 0)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", "0")
        kw = {**build_kw, "num_workers": workers}
        summaries.append(
            build_data(out=out, data=InputArgs(path=corpus_spec), teacher="test_tiny_ensemble", build=BuildArgs(**kw))
        )
        for lock in busy:
            lock.release()
    assert [s["shards_done"] for s in summaries] == [1, 2]
    assert [s["shards_busy"] for s in summaries] == [2, 0]
    assert not summaries[0]["dataset_complete"] and summaries[1]["dataset_complete"]
    assert (out / "manifest.jsonl").read_text() == (built[0] / "manifest.jsonl").read_text()  # same sha256s


def test_a_rank_alone_builds_every_shard_its_own_first(tmp_path, corpus_spec, built, build_kw, monkeypatch):
    """Ranks cooperate through the shard locks: one that finds no other rank at work builds the rest too."""
    out = tmp_path / "ds"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    summary = build_data(
        out=out, data=InputArgs(path=corpus_spec), teacher="test_tiny_ensemble", build=BuildArgs(**build_kw)
    )
    assert summary["shards_done"] == 3 and summary["dataset_complete"]
    order = sorted(range(3), key=lambda k: (out / "_progress" / f"0000000{k}.tar.json").stat().st_mtime_ns)
    assert order[0] == 1  # its own shard first
    assert (out / "manifest.jsonl").read_text() == (built[0] / "manifest.jsonl").read_text()


def test_bad_inputs_are_counted_not_fatal(tmp_path, write_tar, image_bytes):
    huge = image_bytes(120, 100, seed=9)
    good = image_bytes(seed=1)
    samples = [
        {"__key__": "good", "jpg": good, "txt": "a good photo"},
        {"__key__": "trunc", "jpg": good[: len(good) // 2], "txt": "truncated"},
        {"__key__": "junk", "jpg": b"\x00" * 50, "txt": "not an image"},
        {"__key__": "cmyk", "jpg": image_bytes(mode="CMYK", seed=2), "txt": "cmyk photo"},
        {"__key__": "grey", "png": image_bytes(mode="L", fmt="PNG", seed=3), "txt": "grey photo"},
        {"__key__": "rgba", "png": image_bytes(mode="RGBA", fmt="PNG", seed=4), "txt": "rgba photo"},
        {"__key__": "empty", "jpg": good, "txt": "   "},
        {"__key__": "latin", "jpg": good, "txt": b"caf\xe9 au lait"},
        {"__key__": "huge", "jpg": huge, "txt": "too many pixels"},
        {"__key__": "noimg", "txt": "caption only"},
        {"__key__": "nocap", "jpg": good},
    ]
    write_tar(tmp_path / "in.tar", samples)
    out = tmp_path / "ds"
    summary = build_data(
        out=out,
        data=InputArgs(path=str(tmp_path / "in.tar")),
        teacher="test_tiny",
        build=BuildArgs(num_augs=2, batch_size=4, num_workers=0, progress=False, max_pixels=10_000),
    )
    assert summary["written"] == 4
    assert summary["skipped"] == {
        "undecodable": 2,
        "empty_caption": 1,
        "caption_not_utf8": 1,
        "too_large": 1,
        "no_image": 1,
        "no_caption": 1,
    }
    side = json.loads((out / "_progress" / "00000000.tar.json").read_text())
    assert sorted(side["skipped_uids"]) == sorted(
        [
            ["trunc", "undecodable"],
            ["junk", "undecodable"],
            ["empty", "empty_caption"],
            ["latin", "caption_not_utf8"],
            ["huge", "too_large"],
            ["noimg", "no_image"],
            ["nocap", "no_caption"],
        ]
    )
    report = verify_dataset(out)
    assert report["ok"], report["problems"]
    assert report["samples"] == 4


def test_folder_with_several_captions_and_no_images_kept(tmp_path, image_bytes, tiny_ensemble, shard_reader):
    root = tmp_path / "flickr"
    (root / "images").mkdir(parents=True)
    rows = ["image,caption"]
    for k in range(4):
        (root / "images" / f"{k}.jpg").write_bytes(image_bytes(seed=k))
        rows += [f"{k}.jpg,first caption {k}", f'{k}.jpg,"second, caption {k}"', f"{k}.jpg,first caption {k}"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ds"
    summary = build_data(
        out=out,
        data=InputArgs(path=str(root)),
        teacher="test_tiny",
        build=BuildArgs(num_augs=2, batch_size=2, num_workers=0, progress=False, shard_size=3, keep_images=False),
    )
    assert summary["written"] == 4 and summary["shards_done"] == 2
    stored = shard_reader(out / "00000000.tar") + shard_reader(out / "00000001.tar")
    assert [k for k, _ in stored] == ["0", "1", "2", "3"]
    key, m = stored[2]
    assert "jpg" not in m  # --build.keep_images false
    meta = json.loads(m["json"])
    assert meta["image_path"] == "2.jpg" and meta["sha256"] == sha256_bytes((root / "images" / "2.jpg").read_bytes())
    assert meta["captions"] == ["first caption 2", "second, caption 2"]  # duplicates dropped
    assert m["txt"].decode() == "first caption 2"
    assert json.loads(m["syn.json"]) == {"syn_text_gt": ["first caption 2"], "alt_text": ["second, caption 2"]}
    arrays = decode_npz(m["npz"])
    ens = {"test_tiny": tiny_ensemble["test_tiny"]}
    with torch.inference_mode():
        expected = ens["test_tiny"].encode_texts(["second, caption 2"]).numpy()
    np.testing.assert_allclose(arrays["alt_text_emb"].astype(np.float32), expected, atol=ATOL)
    assert verify_dataset(out)["ok"]


def test_captioner_writes_syn_text_and_its_embeddings(tmp_path, corpus, tiny_ensemble, shard_reader):
    out = tmp_path / "ds"
    spec = str(corpus / "train" / "shapes-train-000002.tar")  # 4 samples
    summary = build_data(
        out=out,
        data=InputArgs(path=spec),
        teacher="test_tiny_ensemble",
        captioner="test_tiny_coca",
        build=BuildArgs(num_augs=2, num_syn=2, batch_size=3, num_workers=0, progress=False),
    )
    assert summary["written"] == 4
    for _, m in shard_reader(out / "00000000.tar"):
        syn = json.loads(m["syn.json"])
        assert list(syn) == ["syn_text", "alt_text"]
        assert 1 <= len(syn["syn_text"]) <= 2 and all(isinstance(c, str) and c for c in syn["syn_text"])
        arrays = decode_npz(m["npz"])
        assert arrays["syn_text_emb"].shape == (len(syn["syn_text"]), 80)
        np.testing.assert_allclose(
            arrays["syn_text_emb"].astype(np.float32), _direct_texts(tiny_ensemble, syn["syn_text"]), atol=ATOL
        )
    config = json.loads((out / "config.json").read_text())
    [cap] = config["build"]["captioners"]
    assert cap["name"] == "test_tiny_coca" and cap["syn_key"] == "syn_text" and len(cap["weights_sha256"]) == 64
    assert verify_dataset(out)["ok"]


def test_config_and_layout_follow_datacompdr(built):
    out, _ = built
    config = json.loads((out / "config.json").read_text())
    assert config["num_samples"] == 3 and config["model_name"].count(",") == 1
    aug = config["reinforce"]["image_augmentation"]
    # keys Apple's loader touches: it deletes `normalize` and updates `random_resized_crop`
    assert set(aug["normalize"]) == {"mean", "std"} and aug["random_resized_crop"]["size"] == 48
    assert aug["rand_augment"]["enable"] and aug["rand_augment"]["p"] == 1.0
    progress = json.loads((out / "progress.json").read_text())
    assert progress == {
        "num_input_shards": 3,
        "shards_done": 3,
        "num_samples": 24,
        "skipped": {},
        "failed_inputs": [],
        "complete": True,
    }


def test_rerun_resumes_and_other_arguments_are_refused(tmp_path, built, corpus_spec, build_kw):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    summary = build_data(
        out=out, data=InputArgs(path=corpus_spec), teacher="test_tiny_ensemble", build=BuildArgs(**build_kw)
    )
    assert summary["shards_resumed"] == 3 and summary["shards_done"] == 0 and summary["written"] == 0
    with pytest.raises(ValueError, match="num_samples"):
        build_data(
            out=out,
            data=InputArgs(path=corpus_spec),
            teacher="test_tiny_ensemble",
            build=BuildArgs(**{**build_kw, "num_augs": 4}),
        )


def test_verify_detects_corruption(tmp_path, built):
    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    assert verify_dataset(out)["ok"]
    assert build_data(verify=out)["ok"]
    shard = out / "00000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_dataset(out)
    assert not report["ok"]
    assert any("00000001.tar" in p and "sha256" in p for p in report["problems"])
    with pytest.raises(SystemExit, match="problem"):
        build_data(verify=out)
    (out / "00000002.tar").unlink()
    (out / "00000000.tar.tmp-123").write_bytes(b"partial")
    problems = verify_dataset(out)["problems"]
    assert any("00000002.tar" in p and "missing" in p for p in problems)
    assert any("tmp-123" in p for p in problems)


def test_verify_checks_norms_and_shapes(tmp_path, built, shard_reader):
    """A shard rewritten with a consistent checksum but bad embeddings is still caught."""
    from mcd_common.files import sha256_file
    from reinforced_data._io import TarShardWriter, encode_npz

    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    samples = shard_reader(out / "00000002.tar")
    writer = TarShardWriter(out / "00000002.tar")
    for n, (key, m) in enumerate(samples):
        arrays = decode_npz(m["npz"])
        if n == 0:
            arrays["image_emb"] = arrays["image_emb"] * np.float16(2.0)  # not unit norm
        if n == 1:
            arrays["text_emb"] = np.concatenate([arrays["text_emb"]] * 2)  # two rows
        writer.write(key, {**m, "npz": encode_npz(arrays)})
    writer.close()
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    lines[2]["sha256"] = sha256_file(out / "00000002.tar")
    (out / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    problems = verify_dataset(out)["problems"]
    assert len(problems) == 3
    assert "image_emb[test_tiny] rows" in problems[0] and "unit norm" in problems[0]
    assert "image_emb[test_tiny_b] rows" in problems[1]
    assert "text_emb has shape (2, 80)" in problems[2]


def test_verify_reports_a_bad_syn_json_once_and_does_not_crash(tmp_path, built, shard_reader):
    """syn.json that is a JSON list, or not JSON: each reported (once), verify goes on (it raised AttributeError)."""
    from mcd_common.files import sha256_file
    from reinforced_data._io import TarShardWriter

    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    samples = shard_reader(out / "00000002.tar")
    writer = TarShardWriter(out / "00000002.tar")
    for n, (key, m) in enumerate(samples):
        bad = {0: b"[]", 1: b"{not json"}.get(n)
        writer.write(key, {**m, "syn.json": bad} if bad else m)
    writer.close()
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    lines[2]["sha256"] = sha256_file(out / "00000002.tar")
    (out / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = verify_dataset(out)
    problems = report["problems"]
    first, second = samples[0][0], samples[1][0]
    assert any(first in p and "syn.json is not an object" in p for p in problems), problems
    assert sum(second in p and "syn.json is not valid JSON" in p for p in problems) == 1, problems
    assert report["samples"] == sum(line["num_samples"] for line in lines)


def test_build_args_validation_names_the_flag():
    with pytest.raises(ValueError, match="--build.num_augs"):
        BuildArgs(num_augs=0)
    with pytest.raises(ValueError, match="--build.scale_min"):
        BuildArgs(scale_min=0.0)
    with pytest.raises(ValueError, match="--teacher"):
        build_data(out=Path("x"))


def test_dist_env(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    assert dist_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert dist_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_env() == (2, 4, 0)  # torchrun variables win
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError):
        dist_env()


FLICKR = Path("/work/shared/data/flickr8k")


@pytest.mark.skipif(not FLICKR.is_dir(), reason="flickr8k is not on this machine")
def test_flickr8k_as_is(tmp_path):
    """The shared flickr8k copy (images/, captions.csv, splits/) builds with no preparation."""
    out = tmp_path / "ds"
    summary = build_data(
        out=out,
        data=InputArgs(path=str(FLICKR), split_file=FLICKR / "splits" / "train.txt"),
        teacher="test_tiny",
        build=BuildArgs(num_augs=2, batch_size=4, num_workers=0, progress=False, shard_size=6, max_shards=1),
    )
    assert summary["written"] == 6 and summary["dataset_complete"]
    report = verify_dataset(out)
    assert report["ok"], report["problems"]
