"""Training samples: stored targets per sample, collation, determinism, DataCompDR v1 / pth.gz shards, plain data."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mcd_common.images import decode_image, to_uint8_tensor
from reinforced_data import (
    AugmentCfg,
    ImageTextDataset,
    ReinforcedDataError,
    ReinforcedDataset,
    ReinforcedOptions,
    collate,
)
from reinforced_data._io import decode_npz, encode_npz
from reinforced_data.augment import decode_param_aug, record_rng, replay, sample_record
from reinforced_data.schema import teacher_slices
from reinforced_data.sources import InputStats, iter_samples, resolve_inputs

KEYS = {
    "image",
    "text",
    "caption",
    "syn_text",
    "syn_caption",
    "teacher_image_features",
    "teacher_text_features",
    "teacher_syn_text_features",
}


@pytest.fixture(scope="module")
def tok(tiny_ensemble):
    return tiny_ensemble["test_tiny"].tokenize


def _stored(dataset_samples, root: Path) -> list[tuple[str, dict[str, bytes]]]:
    return list(dataset_samples(root).items())


def _reinforced(source, tok, seed: int = 0, **opts) -> ReinforcedDataset:
    opts.setdefault("image_size", 32)
    return ReinforcedDataset(resolve_inputs(str(source)), ReinforcedOptions(**opts), tok, seed)


def _all(ds, epoch: int = 0) -> list[dict]:
    return [ds[(i, epoch)] for i in range(len(ds))]


def test_samples_carry_the_stored_targets_of_their_view(built, tok, dataset_samples):
    out, _ = built
    samples = _all(_reinforced(out, tok, image_size=40))
    stored = _stored(dataset_samples, out)
    assert len(samples) == len(stored) == 24
    slices = teacher_slices(json.loads((out / "teach.json").read_text())["teachers"])
    used_augs = set()
    for s, (uid, m) in zip(samples, stored, strict=True):
        assert set(s) == KEYS
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 40, 40)
        img = decode_image(m["jpg"])
        records = decode_param_aug(m["paug.json"])
        arrays = decode_npz(m["npz"])
        # the image is one stored record replayed at the student's size, and the features are that record's row
        matches = [k for k, r in enumerate(records) if torch.equal(to_uint8_tensor(replay(img, r, 40)), s["image"])]
        assert matches, uid
        k = matches[0]
        used_augs.add(k)
        for name, sl in slices.items():
            assert s["teacher_image_features"][name].dtype == torch.float32
            np.testing.assert_array_equal(s["teacher_image_features"][name].numpy(), arrays["image_emb"][k, sl])
            np.testing.assert_array_equal(s["teacher_text_features"][name].numpy(), arrays["text_emb"][0, sl])
        assert s["caption"] == m["txt"].decode()
        assert torch.equal(s["text"], tok([s["caption"]])[0])
        alt = json.loads(m["syn.json"])["alt_text"]
        j = alt.index(s["syn_caption"])
        assert torch.equal(s["syn_text"], tok([s["syn_caption"]])[0])
        for name, sl in slices.items():
            np.testing.assert_array_equal(s["teacher_syn_text_features"][name].numpy(), arrays["alt_text_emb"][j, sl])
    assert len(used_augs) > 1  # augmentations are sampled, not always the first


def test_collate_through_a_dataloader(built, tok):
    ds = _reinforced(built[0], tok)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, sampler=[(i, 0) for i in range(10)], collate_fn=collate)
    batch = next(iter(loader))
    assert set(batch) == KEYS
    assert batch["image"].shape == (5, 3, 32, 32) and batch["text"].shape == (5, 16)
    assert batch["teacher_image_features"]["test_tiny_b"].shape == (5, 48)
    assert batch["teacher_syn_text_features"]["test_tiny"].shape == (5, 32)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 5


def test_one_collate_raises_on_mismatched_keys_naming_them():
    """distill's training loader used to drop the synthetic-caption keys of a batch silently; now it raises."""
    from distill.data import collate as train_collate

    assert train_collate is collate
    t = torch.zeros(2)
    with pytest.raises(ValueError, match=r"lacks \['syn_text'\]"):
        train_collate([{"text": t, "syn_text": t}, {"text": t}])
    with pytest.raises(ValueError, match=r"adds \['syn_text'\]"):
        train_collate([{"text": t}, {"text": t, "syn_text": t}])


def _fingerprint(sample: dict) -> tuple:
    return (sample["caption"], sample["syn_caption"], hashlib.sha1(sample["image"].numpy().tobytes()).hexdigest())


def test_epoch_is_explicit_and_samples_do_not_depend_on_workers(built, tok):
    ds = _reinforced(built[0], tok, seed=3, image_size=24)
    keys = [(i, e) for e in (0, 1) for i in range(len(ds))]

    def run(workers: int) -> list[tuple]:
        loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=keys, num_workers=workers)
        return [_fingerprint(s) for s in loader]

    first = run(0)
    assert run(2) == first  # 2 workers: the same samples, made identically
    n = len(ds)
    assert first[:n] != first[n:]  # another epoch draws other augmentations / captions
    # the epoch comes with the key: reading epoch 1 first does not change what epoch 0 gives
    assert _fingerprint(ds[(5, 1)]) == first[n + 5] and _fingerprint(ds[(5, 0)]) == first[5]


def test_sequential_sampling_and_syn_options(built, tok, dataset_samples):
    out, _ = built
    stored = _stored(dataset_samples, out)
    ds = _reinforced(out, tok, aug_sampling="sequential")
    for s, (_, m) in zip(_all(ds, epoch=4), stored, strict=True):
        rec = decode_param_aug(m["paug.json"])[4 % 3]
        assert torch.equal(s["image"], to_uint8_tensor(replay(decode_image(m["jpg"]), rec, 32)))
    plain = _reinforced(out, tok, use_syn=False)[(0, 0)]
    assert set(plain) == KEYS - {"syn_text", "syn_caption", "teacher_syn_text_features"}
    swapped = _reinforced(out, tok, p_syn_swap=1.0)[(0, 0)]
    _, m = stored[0]
    alt = json.loads(m["syn.json"])["alt_text"]
    assert swapped["caption"] in alt and "syn_text" not in swapped
    j = alt.index(swapped["caption"])
    np.testing.assert_array_equal(
        swapped["teacher_text_features"]["test_tiny"].numpy(), decode_npz(m["npz"])["alt_text_emb"][j, :32]
    )
    # the regex selects synthetic keys; the other real captions are their own switch
    assert _reinforced(out, tok, syn_key_regex="^nothing$")[(0, 0)]["syn_caption"] in alt
    none = _reinforced(out, tok, syn_key_regex="^nothing$", alt_captions=False)[(0, 0)]
    assert none["syn_caption"] == none["caption"]  # nothing to draw: the real caption stands in (uniform keys)


def test_apple_loader_view_of_our_shards(built):
    """What apple/ml-mobileclip's `preprocess_dr` reads, decoded with webdataset as its pipeline does."""
    import webdataset as wds

    urls = [str(p) for p in sorted(built[0].glob("*.tar"))]
    pipe = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.decode("pilrgba"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
    )
    n = 0
    for sample in pipe:
        n += 1
        texts = [sample["text"]]
        npz = sample["npz"]
        assert len(npz["text_emb"]) == len(texts)  # else Apple's loader would read it as the v1 layout
        for key, captions in sample["syn.json"].items():
            assert npz[key + "_emb"].shape[0] == len(captions)
        record = sample["paug.json"]["param_aug"][0]
        assert len(record) == 2 and len(record[0]) == 4
        image = sample["image"].convert("RGB")
        assert image.size == (sample["json"]["width"], sample["json"]["height"])
        assert sample["json"]["uid"] == sample["__key__"]
    assert n == 24


def _unit(rng: np.random.Generator, rows: int, dims: list[int]) -> np.ndarray:
    parts = []
    for d in dims:
        x = rng.normal(size=(rows, d))
        parts.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return np.concatenate(parts, axis=1)


def _datacompdr_shard(tmp_path: Path, write_tar, image_bytes, fmt: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """One v1-layout DataCompDR sample: text_emb holds GT then 2 synthetic rows; no teach.json."""
    rng = np.random.default_rng(0)
    img = image_bytes(60, 50)
    records = [sample_record(60, 50, record_rng(0, "s", k), AugmentCfg(crop_size=224)) for k in range(2)]
    image_emb, text_emb = _unit(rng, 2, [16, 16]), _unit(rng, 3, [16, 16])
    sample = {
        "__key__": "000000042",
        "url.txt": "http://example.com/x.jpg",
        "jpg": img,
        "txt": "the real caption",
        "syn.json": json.dumps({"syn_text": ["syn zero", "syn one"]}),
        "paug.json": json.dumps({"param_aug": json.dumps(records)}),  # Hugging Face string form
        "json": json.dumps({"uid": "000000042", "sha256": hashlib.sha256(img).hexdigest()}),
    }
    if fmt == "pth.gz":
        buf = io.BytesIO()
        torch.save(
            {"image_emb": torch.tensor(image_emb).bfloat16(), "text_emb": torch.tensor(text_emb).bfloat16()}, buf
        )
        sample["pth.gz"] = gzip.compress(buf.getvalue())
    else:
        buf = io.BytesIO()
        np.savez(buf, image_emb=image_emb.astype(np.float32), text_emb=text_emb.astype(np.float32))
        sample["npz"] = buf.getvalue()
    path = write_tar(tmp_path / f"dcdr-{fmt.replace('.', '')}.tar", [sample])
    return path, image_emb, text_emb


def test_datacompdr_v1_layout_and_pth_gz(tmp_path, write_tar, image_bytes, tok):
    path, image_emb, text_emb = _datacompdr_shard(tmp_path, write_tar, image_bytes, "pth.gz")
    with pytest.raises(ReinforcedDataError, match="trust_pickle"):
        _reinforced(path, tok, teacher_dims=[16, 16])[(0, 0)]
    with pytest.raises(ReinforcedDataError, match="teacher_dims"):
        _reinforced(path, tok, trust_pickle=True)[(0, 0)]
    s = _reinforced(path, tok, trust_pickle=True, teacher_dims={"openai": 16, "datacomp": 16})[(0, 0)]
    assert set(s["teacher_image_features"]) == {"openai", "datacomp"}
    idx = ["syn zero", "syn one"].index(s["syn_caption"])
    bf16 = torch.tensor(text_emb).bfloat16().float().numpy()  # stored precision
    np.testing.assert_array_equal(s["teacher_syn_text_features"]["datacomp"].numpy(), bf16[1 + idx, 16:])
    np.testing.assert_array_equal(s["teacher_text_features"]["openai"].numpy(), bf16[0, :16])


def test_datacompdr_v1_npz(tmp_path, write_tar, image_bytes, tok):
    path, image_emb, text_emb = _datacompdr_shard(tmp_path, write_tar, image_bytes, "npz")
    s = _reinforced(path, tok, teacher_dims=[16, 16])[(0, 0)]
    assert set(s["teacher_image_features"]) == {"teacher0", "teacher1"}
    idx = ["syn zero", "syn one"].index(s["syn_caption"])
    np.testing.assert_allclose(s["teacher_syn_text_features"]["teacher1"].numpy(), text_emb[1 + idx, 16:], rtol=1e-6)
    rows = [k for k in range(2) if np.allclose(s["teacher_image_features"]["teacher0"].numpy(), image_emb[k, :16])]
    assert len(rows) == 1


def test_newer_schema_is_rejected(tmp_path, built, shard_reader, write_tar, tok):
    key, m = shard_reader(built[0] / "00000000.tar")[0]
    teach = json.loads(m["teach.json"])
    teach["schema_version"] = 99
    path = write_tar(tmp_path / "future.tar", [{"__key__": key, **m, "teach.json": json.dumps(teach)}])
    with pytest.raises(ReinforcedDataError, match="schema_version 99"):
        _reinforced(path, tok)[(0, 0)]  # an error, not a sample skipped as corrupt


def test_image_text_dataset_corpus_and_folder(corpus, tok, tmp_path, image_bytes):
    aug = AugmentCfg(crop_size=32)
    shards = resolve_inputs(None, corpus_dir=corpus)
    ds = ImageTextDataset(shards, tok, 32, "bicubic", aug, seed=0)
    samples = _all(ds)
    assert len(samples) == 24 and set(samples[0]) == {"image", "text", "caption"}
    assert samples[0]["image"].shape == (3, 32, 32) and samples[0]["text"].shape == (16,)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(samples, _all(ds), strict=True))
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(samples, _all(ds, 1), strict=True))
    views = _all(ImageTextDataset(shards, tok, 24, "bicubic", None, seed=0))
    raws = [raw for shard in shards for raw in iter_samples(shard)]
    assert all(v["caption"] in raw.captions for v, raw in zip(views, raws, strict=True))
    assert views[0]["image"].shape == (3, 24, 24)  # evaluation view: resize + centre crop


def test_image_text_captions_are_checked_and_normalised(tmp_path, tok, image_bytes):
    """Plain training data skipped `check_caption`: a blank caption was trained on, whitespace kept."""
    (tmp_path / "imgs").mkdir()
    for k in range(3):
        (tmp_path / "imgs" / f"{k}.jpg").write_bytes(image_bytes(seed=k))
    (tmp_path / "caps.csv").write_text("image,caption\n0.jpg,  a   red\tsquare \n1.jpg,  \n2.jpg,one\n")
    stats = InputStats()
    shards = resolve_inputs(tmp_path / "imgs", captions=tmp_path / "caps.csv", stats=stats)
    assert stats.rows_skipped == {"no_caption": 1}  # the blank row is counted where it is read
    ds = ImageTextDataset(shards, tok, 16, "bicubic", AugmentCfg(crop_size=16), seed=0)
    captions = [s["caption"] for s in _all(ds)]
    # image 1 has no usable caption: it is not a sample, and no other sample is served twice in its place
    assert captions == ["a red square", "one"]
    assert ds.stats()["replaced_at_load"] == 0


def test_image_text_tar_samples_without_caption_are_left_out_and_counted(tmp_path, tok, image_bytes, write_tar):
    img = image_bytes(seed=1)
    path = write_tar(
        tmp_path / "plain.tar",
        [
            {"__key__": "a", "jpg": img, "txt": "a photo"},
            {"__key__": "b", "jpg": img, "txt": "  "},
            {"__key__": "c", "txt": "no image"},
            {"__key__": "a", "jpg": img, "txt": "a again"},
            {"__key__": "d", "jpg": img, "json": json.dumps({"caption": "from json"})},
        ],
    )
    ds = ImageTextDataset(resolve_inputs(str(path)), tok, 16, "bicubic", None, seed=0)
    assert [s["caption"] for s in _all(ds)] == ["a photo", "from json"]
    stats = ds.stats()
    assert stats["samples_indexed"] == 5 and stats["samples_usable"] == 2
    assert stats["skipped"] == {"empty_caption": 1, "no_image": 1, "duplicate_uid": 1}


def _pth_gz(image_emb: np.ndarray, text_emb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    torch.save({"image_emb": torch.tensor(image_emb).bfloat16(), "text_emb": torch.tensor(text_emb).bfloat16()}, buf)
    return gzip.compress(buf.getvalue())


def test_apples_empty_embeddings_are_skipped_and_counted_never_replaced(tmp_path, write_tar, image_bytes, tok):
    """apple/ml-mobileclip-dr#3: a 50-sample shard built in batches of 16 has empty arrays for 34 samples. They
    used to be replaced by their neighbours (the index kept all 50; sample 0 came back 35 times per epoch)."""
    rng = np.random.default_rng(0)
    img = image_bytes(40, 30)
    records = json.dumps(
        {"param_aug": [sample_record(40, 30, record_rng(0, "s", k), AugmentCfg(crop_size=32)) for k in range(2)]}
    )
    samples = []
    for n in range(50):
        if n < 16:
            arrays = _pth_gz(_unit(rng, 2, [16, 16]), _unit(rng, 1, [16, 16]))
        else:
            arrays = _pth_gz(np.zeros((0, 32)), np.zeros((0, 32)))  # what the generator wrote past batch 1
        samples.append(
            {"__key__": f"{n:09d}", "jpg": img, "txt": f"caption {n}", "paug.json": records, "pth.gz": arrays}
        )
    path = write_tar(tmp_path / "apple.tar", samples)
    ds = _reinforced(path, tok, trust_pickle=True, teacher_dims=[16, 16])
    assert len(ds) == 16
    epoch = [ds[(i, 0)]["caption"] for i in range(len(ds))]
    assert sorted(epoch) == sorted(f"caption {n}" for n in range(16))  # each usable sample once
    stats = ds.stats()
    assert stats["samples_indexed"] == 50 and stats["samples_usable"] == 16
    assert stats["skipped"] == {"empty_embeddings": 34} and stats["replaced_at_load"] == 0
    assert stats["skipped_examples"][0].endswith("000000016: empty_embeddings")


def test_every_kind_of_bad_stored_sample_is_counted(tmp_path, built, shard_reader, write_tar, tok):
    """Index-time checks of the small members: each bad sample is left out under its own reason."""
    stored = shard_reader(built[0] / "00000000.tar")
    good = [(k, m) for k, m in stored[:2]]
    bad = {}
    k, m = stored[2]
    bad["no_paug"] = {kk: v for kk, v in m.items() if kk != "paug.json"}
    k, m = stored[3]
    bad["unreadable_embeddings"] = {**m, "npz": b"PK\x03\x04 not a zip"}
    k, m = stored[4]
    arrays = decode_npz(m["npz"])
    bad["wrong_width"] = {**m, "npz": encode_npz({**arrays, "image_emb": arrays["image_emb"][:, :40]})}
    k, m = stored[5]
    bad["nonfinite_embeddings"] = {**m, "npz": encode_npz({**arrays, "text_emb": arrays["text_emb"] * np.nan})}
    k, m = stored[6]
    bad["bad_paug"] = {**m, "paug.json": b"{not json"}
    k, m = stored[7]
    bad["empty_caption"] = {**m, "txt": b"  "}
    first = write_tar(
        tmp_path / "a.tar",
        [{"__key__": k, **m} for k, m in good] + [{"__key__": f"bad_{r}", **m} for r, m in bad.items()],
    )
    second = write_tar(tmp_path / "b.tar", [{"__key__": good[0][0], **good[0][1]}])  # the same uid again
    ds = _reinforced(f"{first}::{second}", tok)
    assert len(ds) == 2
    assert ds.stats()["skipped"] == {**dict.fromkeys(bad, 1), "duplicate_uid": 1}


def test_fast_npz_reader_matches_numpy_and_refuses_pickles():
    from reinforced_data._io import decode_npz_arrays

    rng = np.random.default_rng(0)
    arrays = {"image_emb": rng.normal(size=(3, 8)).astype(np.float16), "text_emb": rng.normal(size=(1, 8))}
    buf = io.BytesIO()
    np.savez(buf, **arrays, fortran=np.asfortranarray(rng.normal(size=(4, 3))), empty=np.zeros((0, 8)))
    for blob in (encode_npz(arrays), buf.getvalue()):
        got = decode_npz_arrays(blob, ("image_emb", "text_emb", "missing"))
        assert list(got) == ["image_emb", "text_emb"]
        for name, arr in got.items():
            assert arr.dtype == arrays[name].dtype and np.array_equal(arr, arrays[name])
    got = decode_npz_arrays(buf.getvalue(), ("fortran", "empty"))  # numpy's own reader for Fortran order
    assert got["fortran"].shape == (4, 3) and got["empty"].shape == (0, 8)
    pickled = io.BytesIO()
    np.savez(pickled, image_emb=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        decode_npz_arrays(pickled.getvalue(), ("image_emb",))


def test_every_sample_s_npz_is_read_like_numpy_but_writable_and_pickles_refused():
    # decode_npz (what the training reader calls per sample) takes the fast header path and returns what np.load does
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    arrays = {"image_emb": rng.normal(size=(3, 8)).astype(np.float16), "text_emb": rng.normal(size=(1, 8))}
    np.savez(buf, **arrays, fortran=np.asfortranarray(rng.normal(size=(4, 3))))
    for blob in (encode_npz(arrays), buf.getvalue()):
        with np.load(io.BytesIO(blob), allow_pickle=False) as ref:
            expected = {k: ref[k] for k in ref.files}
        got = decode_npz(blob)
        assert list(got) == list(expected)
        for name, arr in got.items():
            assert arr.dtype == expected[name].dtype and np.array_equal(arr, expected[name])
            assert arr.flags.writeable  # not a view of the shard's bytes
    pickled = io.BytesIO()
    np.savez(pickled, image_emb=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        decode_npz(pickled.getvalue())


def test_cached_tokenizer_gives_the_tokenizers_rows_and_tokenizes_each_caption_once():
    import pickle

    from reinforced_data.reader import CachedTokenizer
    from students import create_student

    tokenize = create_student("test_tiny").text_tokenizer()
    seen: list[str] = []

    def counting(texts):
        seen.extend(texts)
        return tokenize(texts)

    cached = CachedTokenizer(counting, max_entries=3)
    captions = ["a red circle", "two blue squares", "a red circle"]
    first = cached(captions)
    assert first.dtype == torch.long and torch.equal(first, tokenize(captions))
    assert seen == ["a red circle", "two blue squares"]  # duplicates within a call tokenized once
    first[0, 0] = -1  # the caller owns what it gets
    again = cached(["two blue squares", "a red circle"])
    assert torch.equal(again, tokenize(["two blue squares", "a red circle"]))
    assert seen == ["a red circle", "two blue squares"]  # from memory
    over = cached(["one", "two green lines"])  # beyond max_entries: tokenized, not remembered
    assert torch.equal(over, tokenize(["one", "two green lines"]))
    cached(["one"])
    assert seen[-3:] == ["one", "two green lines", "one"]
    worker = CachedTokenizer(tokenize)
    worker(captions)
    clone = pickle.loads(pickle.dumps(worker))  # what a loader worker receives: no memory
    assert clone._rows == {} and torch.equal(clone(["a red circle"]), tokenize(["a red circle"]))
