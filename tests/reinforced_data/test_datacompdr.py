"""Our shards against DataCompDR's format as Apple's code defines it (apple/ml-mobileclip 4144bb1f081a
`training/dr/transforms.py` + `training/open_clip_v2.patch`; apple/ml-mobileclip-dr 418551d5a8ef `scripts/gen.py`),
and Apple's records, layouts and roots read by ours. The expectations below are written from the format (see the
`reinforced_data.schema` and `reinforced_data.augment` docstrings), not from our code."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

from mcd_common.images import decode_image, to_uint8_tensor
from reinforced_data import (
    BuildArgs,
    InputArgs,
    RecordLayout,
    ReinforcedDataError,
    ReinforcedDataset,
    ReinforcedOptions,
    build_data,
    decode_record,
    replay,
    resolve_inputs,
    verify_dataset,
)
from reinforced_data._io import decode_npz, encode_npz
from reinforced_data.augment import OP_NAMES

APPLE_REGEX = r"^syn_text.*$"  # Apple's default --dataset-reinforcement-syn-text-key-regex


def _apple_v2_reads(sample: dict, regex: str = APPLE_REGEX) -> list[tuple[str, int]]:
    """Every (syn key, caption index) Apple's `preprocess_dr` can draw for a webdataset-decoded sample, checking
    each access it makes: `syn.json` (unconditional), a non-empty matching key list, `text_emb[capi]`, and
    `<key>_emb[scapi]` (v2) unless `text_emb` has more rows than real captions (v1)."""
    texts = [sample["txt"]]
    syn = sample["syn.json"]  # KeyError('syn.json') when missing: Apple's whole epoch dies
    keys = [k for k in syn.keys() if re.match(regex, k)]
    assert keys, "np.random.randint(0, 0) in Apple's loader"
    npz = sample["npz"]
    assert len(npz["text_emb"]) == len(texts)  # else Apple reads the v1 layout
    draws = []
    for key in keys:
        assert len(syn[key]) > 0
        for idx in range(len(syn[key])):
            assert npz[key + "_emb"][idx].shape == npz["text_emb"][0].shape
            draws.append((key, idx))
    return draws


def _apple_pipeline(root: Path) -> list[dict]:
    urls = [str(p) for p in sorted(root.glob("*.tar"))]
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode("pilrgba")))


def test_every_shard_loads_in_apples_loader_and_human_captions_are_not_synthetic(built, tmp_path, corpus, build_kw):
    """Without captioner and alt captions no syn.json was written (KeyError in Apple's loader); with alt captions
    the other human captions sat under `syn_text_alt`, which Apple's regex draws as synthetic."""
    out = tmp_path / "bare"
    spec = str(corpus / "train" / "shapes-train-000002.tar")
    build_data(
        out=out, data=InputArgs(path=spec), teacher="test_tiny", build=BuildArgs(**{**build_kw, "alt_captions": False})
    )
    for root in (out, built[0]):
        samples = _apple_pipeline(root)
        assert samples
        for s in samples:
            for key, idx in _apple_v2_reads(s):
                caption = s["syn.json"][key][idx]
                # no human caption other than the real one (the placeholder) is presented as synthetic
                assert caption == s["txt"] or caption not in s["json"].get("captions", []), (key, caption)
        assert verify_dataset(root)["ok"]
    human = [s for s in _apple_pipeline(built[0]) if "alt_text" in s["syn.json"]]
    assert human and all(not re.match(APPLE_REGEX, "alt_text") for _ in human)


def test_the_old_alt_key_is_still_read(built, tmp_path, tiny_ensemble, shard_reader, write_tar):
    key, m = shard_reader(built[0] / "00000000.tar")[0]
    syn = json.loads(m["syn.json"])
    arrays = decode_npz(m["npz"])
    old_syn = {"syn_text_alt": syn["alt_text"]}  # schema 1: no placeholder, human captions under syn_text_alt
    old_arrays = {k: v for k, v in arrays.items() if not k.startswith(("alt_text", "syn_text_gt"))}
    old_arrays["syn_text_alt_emb"] = arrays["alt_text_emb"]
    teach = {**json.loads(m["teach.json"]), "schema_version": 1}
    members = {**m, "syn.json": json.dumps(old_syn), "npz": encode_npz(old_arrays), "teach.json": json.dumps(teach)}
    path = write_tar(tmp_path / "old.tar", [{"__key__": key, **members}])
    tok = tiny_ensemble["test_tiny"].tokenize
    ds = ReinforcedDataset(resolve_inputs(str(path)), ReinforcedOptions(image_size=32), tok, seed=0)
    drawn = {ds[(0, e)]["syn_caption"] for e in range(6)}
    assert drawn and drawn <= set(syn["alt_text"])


# ------------------------------------------------------------------------------------------- augmentation records


def _image(w: int = 80, h: int = 60, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _apple_view(img: Image.Image, box, ops, erase, size: int) -> torch.Tensor:
    """Apple's reapply order by hand with torchvision: RRC -> RandAugment -> to_tensor -> random_erase (float)."""
    out = F.resized_crop(img, *box, [size, size], InterpolationMode.BICUBIC, antialias=True)
    for op, mag in ops or ():
        out = _apply_op(out, OP_NAMES[op], mag, interpolation=InterpolationMode.NEAREST, fill=None)
    t = F.to_tensor(out)
    if erase is not None:
        x, y, h, w = erase
        if x != -1:
            t[:, x : x + h, y : y + w] = 0
    return t


ERASE_CFG = {
    "random_resized_crop": {"size": 32, "interpolation": "bicubic"},
    "rand_augment": {"enable": True, "p": 0.5},
    "random_erase": {"enable": True, "p": 0.5},
    "random_horizontal_flip": {"enable": False},
    "to_tensor": {"enable": True},
    "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3},
}


@pytest.mark.parametrize(
    "record",
    [
        [[4, 6, 40, 50], [[5, 12.0], [3, -7.0]], [3, 5, 10, 12]],
        [[4, 6, 40, 50], None, [3, 5, 10, 12]],  # we rejected it (read the erase box as RandAugment ops)
        [[4, 6, 40, 50], [[5, 12.0], [11, 40.0]], None],  # we dropped its RandAugment ops (the null looked like them)
        [[0, 0, 60, 80], None, None],
        [[4, 6, 40, 50], [[13, 0.0], [0, 0.0]], [-1, -1, -1, -1]],  # erase that found no box
    ],
)
def test_records_decode_by_position_and_replay_random_erasing(record):
    layout = RecordLayout.from_config(ERASE_CFG)
    assert layout.fields == ("random_resized_crop", "rand_augment", "random_erase")
    rec = decode_record(record, layout)
    assert rec.view.ops == tuple((op, mag) for op, mag in record[1] or ())
    img = _image()
    ref = _apple_view(img, record[0], record[1], record[2], 32)
    got = to_uint8_tensor(replay(img, record, 32, layout=layout))
    assert torch.equal(got, (ref * 255).round().to(torch.uint8))
    with pytest.raises(ValueError, match="defines 3"):
        decode_record(record[:2], layout)  # a record that does not fit the config is refused, never guessed


MIX_CFG = {
    "random_resized_crop": {"size": 32},
    "rand_augment": {"enable": True},
    "to_tensor": {"enable": True},
    "normalize": {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28]},
    "mixup": {"alpha": 1.0},
    "cutmix": {"alpha": 1.0},
}


def _mix_shards(tmp_path: Path, write_tar, records_a: list, *, with_partner: bool) -> list:
    """Samples `a` (whose records name a partner) and, optionally, `000000007` (the partner)."""
    rng = np.random.default_rng(0)

    def member(img: Image.Image, records: list) -> dict:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        emb = rng.normal(size=(len(records), 16)).astype(np.float16)
        return {
            "png": buf.getvalue(),
            "txt": "a caption",
            "paug.json": json.dumps({"param_aug": records}),
            "npz": encode_npz({"image_emb": emb, "text_emb": emb[:1]}),
        }

    samples = [{"__key__": "a", **member(_image(seed=1), records_a)}]
    if with_partner:
        samples.append(
            {"__key__": "000000007", **member(_image(70, 90, seed=2), [[None, [0, 0, 90, 70], None, None, None]])}
        )
    return resolve_inputs(str(write_tar(tmp_path / "mix.tar", samples)))


def test_mixup_and_cutmix_records_replay_with_their_partner(tmp_path, write_tar):
    layout = RecordLayout.from_config(MIX_CFG)
    assert layout.mixing and layout.fields == ("random_resized_crop", "rand_augment", "mixup", "cutmix")
    box_a, box_b = [2, 3, 50, 60], [5, 1, 60, 50]
    ops_a, ops_b = [[1, 0.2], [6, -0.5]], [[7, 0.4], [12, 0.0]]
    mixup = ["000000007", [box_a, box_b], [ops_a, ops_b], 0.3, None]
    cutmix = [7, [box_a, box_b], [ops_a, None], None, [0.6, 4, 6, 20, 30]]  # integer id of a numeric key
    plain = [None, box_a, ops_a, None, None]  # no partner drawn: a record like any other
    shards = _mix_shards(tmp_path, write_tar, [mixup, cutmix, plain], with_partner=True)
    opts = ReinforcedOptions(image_size=32, teacher_dims=[16], record_layout=layout, aug_sampling="sequential")
    ds = ReinforcedDataset(shards, opts, lambda t: torch.zeros(len(t), 4), seed=0)
    a, b = _image(seed=1), _image(70, 90, seed=2)
    mean = torch.tensor(MIX_CFG["normalize"]["mean"]).view(3, 1, 1)
    std = torch.tensor(MIX_CFG["normalize"]["std"]).view(3, 1, 1)
    va, vb = _apple_view(a, box_a, ops_a, None, 32), _apple_view(b, box_b, ops_b, None, 32)
    # MixUp after normalize, as Apple composes it; our uint8 loader rounds it (within one grey level)
    mixed = (0.3 * (va - mean) / std + 0.7 * (vb - mean) / std) * std + mean
    got = ds[(0, 0)]["image"].float()
    assert (got - mixed * 255).abs().max() <= 1.0
    # CutMix pastes rows 4:20, columns 6:30 of the partner view (RandAugment skipped for the partner: null)
    vb_plain = _apple_view(b, box_b, None, None, 32)
    expected = va.clone()
    expected[:, 4:20, 6:30] = vb_plain[:, 4:20, 6:30]
    assert torch.equal(ds[(0, 1)]["image"], (expected * 255).round().to(torch.uint8))
    assert torch.equal(ds[(0, 2)]["image"], (va * 255).round().to(torch.uint8))


def test_a_mixing_record_without_its_partner_is_refused(tmp_path, write_tar):
    layout = RecordLayout.from_config(MIX_CFG)
    record = ["000000007", [[2, 3, 50, 60], [5, 1, 60, 50]], [None, None], 0.3, None]
    shards = _mix_shards(tmp_path, write_tar, [record], with_partner=False)
    opts = ReinforcedOptions(image_size=32, teacher_dims=[16], record_layout=layout)
    ds = ReinforcedDataset(shards, opts, lambda t: torch.zeros(len(t), 4), seed=0)
    with pytest.raises(ReinforcedDataError, match="mixes \\(mixup\\) it with sample '000000007'"):
        ds[(0, 0)]
    with pytest.raises(ValueError, match="image is needed"):
        replay(_image(), record, 32, layout=layout)


def test_unreplayable_layouts_are_refused_up_front():
    layout = RecordLayout.from_config({"resize": {"size": 256}, "random_crop": {"size": 224}})
    with pytest.raises(ValueError, match="cannot be replayed"):
        ReinforcedOptions(image_size=32, record_layout=layout)


# -------------------------------------------------------------------------------------------------- dataset roots


def test_raygen_root_manifest_is_read(tmp_path, built, tiny_ensemble):
    """RayGen's manifest (`{"shard": "00000000", "num_uids": N}`, no .tar suffix) lists the shards to read."""
    from distill.args import DataArgs
    from distill.data import resolve_data

    root = tmp_path / "raygen"
    root.mkdir()
    for name in ("00000000.tar", "00000001.tar"):
        (root / name).write_bytes((built[0] / name).read_bytes())
    (root / "manifest.jsonl").write_text(json.dumps({"shard": "00000001", "num_uids": 10}) + "\n")
    shards = resolve_inputs(root)
    assert [Path(s.path).name for s in shards] == ["00000001.tar"]  # the unlisted tar is not read
    spec = resolve_data(DataArgs(path=str(root)))
    assert spec.reinforced and spec.teacher_dims() == {"test_tiny": 32, "test_tiny_b": 48}
    tok = tiny_ensemble["test_tiny"].tokenize
    ds = ReinforcedDataset(spec.shards, ReinforcedOptions(image_size=32), tok, seed=0)
    assert len(ds) == 10 and ds[(9, 0)]["image"].shape == (3, 32, 32)


def test_config_layout_reaches_training(tmp_path, built):
    from distill.args import DataArgs
    from distill.data import resolve_data

    assert resolve_data(DataArgs(path=str(built[0]))).record_layout.fields == ("random_resized_crop", "rand_augment")
    root = tmp_path / "copy"
    root.mkdir()
    (root / "00000000.tar").write_bytes((built[0] / "00000000.tar").read_bytes())
    config = json.loads((built[0] / "config.json").read_text())
    config["reinforce"]["image_augmentation"]["random_erase"] = {"p": 0.25}
    (root / "config.json").write_text(json.dumps(config))
    spec = resolve_data(DataArgs(path=str(root)))
    assert spec.record_layout.fields == ("random_resized_crop", "rand_augment", "random_erase")


def test_replay_once_and_resize_matches_raygen(tmp_path, corpus, tiny_ensemble, dataset_samples):
    """`teacher_views="resize"`: one view at the crop size, then bicubic F.interpolate per teacher, chained in
    ensemble order (RayGen's loop reassigns its `image`); the default replays at each teacher's own size."""
    out = tmp_path / "ds"
    spec = str(corpus / "train" / "shapes-train-000002.tar")
    kw = dict(num_augs=2, batch_size=3, num_workers=0, progress=False, teacher_views="resize")
    build_data(out=out, data=InputArgs(path=spec), teacher="test_tiny_ensemble", build=BuildArgs(**kw))
    config = json.loads((out / "config.json").read_text())
    assert config["build"]["teacher_views"] == "resize"
    crop = config["reinforce"]["image_augmentation"]["random_resized_crop"]["size"]
    assert crop == 48
    for _, m in dataset_samples(out).items():
        img = decode_image(m["jpg"])
        records = json.loads(m["paug.json"])["param_aug"]
        image = torch.stack([to_uint8_tensor(replay(img, r, crop)) for r in records]).float() / 255
        expected = []
        with torch.inference_mode():
            for member in tiny_ensemble.values():  # test_tiny (32 px), then test_tiny_b (48 px)
                if image.shape[-1] != member.image_size:
                    image = torch.nn.functional.interpolate(image, size=(member.image_size,) * 2, mode="bicubic")
                expected.append(member.encode_image(image).numpy())
        got = decode_npz(m["npz"])["image_emb"].astype(np.float32)
        np.testing.assert_allclose(got, np.concatenate(expected, axis=1), atol=2e-3)


def test_verify_reports_a_sample_apples_loader_cannot_read(tmp_path, built, shard_reader):
    import shutil

    from mcd_common.files import sha256_file
    from reinforced_data._io import TarShardWriter

    out = tmp_path / "copy"
    shutil.copytree(built[0], out)
    samples = shard_reader(out / "00000002.tar")
    writer = TarShardWriter(out / "00000002.tar")
    for n, (key, m) in enumerate(samples):
        writer.write(key, {k: v for k, v in m.items() if not (n == 0 and k == "syn.json")})
    writer.close()
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    lines[2]["sha256"] = sha256_file(out / "00000002.tar")
    (out / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    problems = verify_dataset(out)["problems"]
    assert any("no syn.json" in p and samples[0][0] in p for p in problems), problems
