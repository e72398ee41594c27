"""Augmentation records: format, op table, replay against torchvision (image decoding: tests/mcd_common)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op

from reinforced_data.augment import (
    OP_NAMES,
    AugmentCfg,
    RecordLayout,
    decode_param_aug,
    decode_record,
    op_magnitudes,
    record_rng,
    replay,
    sample_record,
)


def _image(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def test_op_table_matches_torchvision():
    space = RandAugment()._augmentation_space(31, (224, 224))
    assert tuple(space) == OP_NAMES
    for (name, bins, signed), (ref_name, (ref_bins, ref_signed)) in zip(
        op_magnitudes(31, 224), space.items(), strict=True
    ):
        assert name == ref_name and signed == ref_signed
        expected = [float(v) for v in ref_bins.tolist()] if ref_bins.ndim > 0 else []
        assert list(bins) == expected
    # DataCompDR's stored translate magnitude: 150/331 * 224 * 9/30 px
    assert op_magnitudes(31, 224)[OP_NAMES.index("TranslateX")][1][9] == pytest.approx(30.4532, abs=1e-3)


def test_record_format_and_determinism():
    cfg = AugmentCfg(crop_size=224)
    table = op_magnitudes(31, 224)
    for k in range(200):
        rec = sample_record(640, 480, record_rng(0, "uid", k), cfg)
        assert len(rec) == 2
        i, j, h, w = rec[0]
        assert all(isinstance(v, int) for v in rec[0])
        assert 0 <= i and i + h <= 480 and 0 <= j and j + w <= 640 and h > 0 and w > 0
        assert len(rec[1]) == 2
        for op, mag in rec[1]:
            name, bins, signed = table[op]
            expected = bins[9] if bins else 0.0
            assert abs(mag) == expected and (signed or mag >= 0)
        assert json.loads(json.dumps(rec)) == rec  # JSON-able, exact float round trip
        assert sample_record(640, 480, record_rng(0, "uid", k), cfg) == rec  # (seed, uid, index) determines it
    assert sample_record(640, 480, record_rng(1, "uid", 0), cfg) != sample_record(
        640, 480, record_rng(0, "uid", 0), cfg
    )


def test_record_variants():
    rec = sample_record(100, 100, record_rng(0, "a", 0), AugmentCfg(hflip=True))
    assert len(rec) == 3 and isinstance(rec[1], bool)  # ml-dr order: crop, flip, rand_augment
    assert sample_record(100, 100, record_rng(0, "a", 0), AugmentCfg(p=0.0))[1] is None
    assert len(sample_record(100, 100, record_rng(0, "a", 0), AugmentCfg(rand_augment=False))) == 1
    flips = [sample_record(50, 50, record_rng(0, "a", k), AugmentCfg(hflip=True))[1] for k in range(200)]
    assert 60 < sum(flips) < 140


def test_crop_boxes_follow_scale_and_ratio():
    cfg = AugmentCfg(scale=(0.25, 0.5), ratio=(0.75, 4 / 3))
    for k in range(300):
        i, j, h, w = sample_record(400, 300, record_rng(3, "b", k), cfg)[0]
        # rounding of w and h widens the bounds slightly
        assert 0.25 * 0.95 <= h * w / (400 * 300) <= 0.5 * 1.05
        assert 0.75 * 0.97 <= w / h <= 4 / 3 * 1.03
    # a degenerate 1000x10 strip falls back to a central crop at the widest allowed ratio
    i, j, h, w = sample_record(1000, 10, record_rng(0, "c", 0), AugmentCfg(scale=(0.9, 1.0)))[0]
    assert (h, w) == (10, round(10 * 4 / 3)) and j == (1000 - w) // 2


@pytest.mark.parametrize("op", range(len(OP_NAMES)))
def test_replay_matches_torchvision_ops(op: int):
    img = _image()
    name, bins, signed = op_magnitudes(31, 64)[op]
    for sign in (1, -1) if signed else (1,):
        mag = sign * (bins[9] if bins else 0.0)
        record = [[5, 7, 50, 60], [[op, mag], [op, mag]]]
        out = replay(img, record, 64)
        # reference: torchvision RandAugment's own op application on PIL (NEAREST, fill None)
        ref = F.resized_crop(img, 5, 7, 50, 60, [64, 64], InterpolationMode.BICUBIC, antialias=True)
        for _ in range(2):
            ref = _apply_op(ref, name, mag, interpolation=InterpolationMode.NEAREST, fill=None)
        assert np.array_equal(np.asarray(out), np.asarray(ref)), name


def test_replay_sizes_and_flip():
    img = _image()
    cfg = AugmentCfg(crop_size=32, rand_augment=False)
    rec = sample_record(img.width, img.height, record_rng(0, "x", 1), cfg)
    crop_only = cfg.record_layout()
    assert crop_only == RecordLayout(("random_resized_crop",))
    for size in (16, 32, (24, 40)):
        out = replay(img, rec, size, layout=crop_only)
        expected = (size, size) if isinstance(size, int) else (size[1], size[0])
        assert out.size == expected
    flipped = replay(img, [rec[0], True], 32, layout=RecordLayout(("random_resized_crop", "random_horizontal_flip")))
    assert np.array_equal(np.asarray(flipped), np.asarray(replay(img, rec, 32, layout=crop_only))[:, ::-1])
    # the same record replayed twice is bit-identical
    rec2 = sample_record(img.width, img.height, record_rng(0, "x", 2), AugmentCfg(crop_size=32))
    assert np.array_equal(np.asarray(replay(img, rec2, 48)), np.asarray(replay(img, rec2, 48)))


def test_decode_record_rejects_garbage():
    for bad in ([], [[1, 2, 3], None], [[0, 0, 0, 5], None], [[0, 0, 4, 4], [[99, 1.0]]], [[0, 0, 4, 4], "x"]):
        with pytest.raises(ValueError):
            decode_record(bad)


def test_decode_param_aug_forms():
    records = [[[1, 2, 3, 4], [[2, -0.09], [4, -30.45]]], [[0, 0, 5, 5], None]]
    doc = {"param_aug": records}
    assert decode_param_aug(doc) == records
    assert decode_param_aug(records) == records
    assert decode_param_aug(json.dumps(doc)) == records
    assert decode_param_aug(json.dumps(doc).encode()) == records
    assert decode_param_aug({"param_aug": json.dumps(records)}) == records  # Hugging Face string form
    assert decode_param_aug(json.dumps(json.dumps(doc))) == records
    with pytest.raises(ValueError):
        decode_param_aug({"other": 1})


def test_augment_cfg_validation():
    with pytest.raises(ValueError, match="magnitude"):
        AugmentCfg(magnitude=31)
    with pytest.raises(ValueError, match="scale"):
        AugmentCfg(scale=(0.0, 1.0))
    cfg = AugmentCfg(hflip=True).to_dr_config()
    assert cfg["random_resized_crop"]["size"] == 224 and cfg["random_horizontal_flip"]["p"] == 0.5
    assert cfg["rand_augment"] == {"enable": True, "p": 1.0, "num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31}
