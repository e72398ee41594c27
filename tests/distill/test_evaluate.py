"""`distill eval`: metrics against naive loops, and end-to-end runs on teachers and students."""

import json

import pytest
import torch
import torch.nn.functional as F

from distill.evaluate import CaptionSet, ImageFolderSet, evaluate, load_image, retrieval_metrics, zeroshot_classifier


def _naive_recall(img, txt, owner, k):
    sims = img @ txt.T
    i2t = t2i = 0
    for i in range(img.shape[0]):
        top = sims[i].argsort(descending=True)[:k].tolist()
        i2t += any(owner[j] == i for j in top)
    for j in range(txt.shape[0]):
        top = sims[:, j].argsort(descending=True)[:k].tolist()
        t2i += int(owner[j]) in top
    return 100.0 * i2t / img.shape[0], 100.0 * t2i / txt.shape[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_naive(seed):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    owner = torch.arange(12).repeat_interleave(3)  # 3 captions per image
    txt = F.normalize(img[owner] + 0.9 * torch.randn(36, 8, generator=g), dim=-1)
    got = retrieval_metrics(img, txt, owner)
    for k in (1, 5, 10):
        i2t, t2i = _naive_recall(img, txt, owner, k)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)


def test_perfect_embeddings_give_full_recall():
    img = torch.eye(6)
    owner = torch.arange(6).repeat_interleave(2)
    m = retrieval_metrics(img, img[owner], owner)
    assert m["i2t_R@1"] == m["t2i_R@1"] == 100.0


def test_zeroshot_classifier_is_normalised_prompt_mean():
    table = {
        "a x.": torch.tensor([1.0, 0.0]),
        "b x.": torch.tensor([0.0, 1.0]),
        "a y.": torch.tensor([1.0, 1.0]),
        "b y.": torch.tensor([1.0, -1.0]),
    }
    w = zeroshot_classifier(lambda texts: torch.stack([table[t] for t in texts]), ["x", "y"], ["a {}.", "b {}."])
    assert w.shape == (2, 2)
    torch.testing.assert_close(w[:, 0], F.normalize(torch.tensor([0.5, 0.5]), dim=0))
    torch.testing.assert_close(w[:, 1], torch.tensor([1.0, 0.0]))


def test_datasets_read_corpus_layouts(tiny_corpus):
    zs = ImageFolderSet(tiny_corpus / "zeroshot", 24)
    assert len(zs.classes) == 30 and zs[0]["image"].shape == (3, 24, 24) and zs.templates
    cs = CaptionSet(tiny_corpus / "val", 24)
    assert len(cs) == 16 and len(cs[0]["captions"]) == 5


def test_flickr_layout_with_split_file(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "images" / name)
    (tmp_path / "captions.csv").write_text(
        'image,caption\na.jpg,"one, with comma"\na.jpg,two\nb.jpg,three\nc.jpg,four\n'
    )
    (tmp_path / "test.txt").write_text("b.jpg\na.jpg\n")
    cs = CaptionSet(tmp_path, 16, split_file=tmp_path / "test.txt")
    assert [c["captions"] for c in (cs[0], cs[1])] == [["three"], ["one, with comma", "two"]]


def test_evaluate_teacher_and_student_end_to_end(tmp_path, tiny_corpus):
    sets = dict(zeroshot=str(tiny_corpus / "zeroshot"), retrieval=str(tiny_corpus / "val"))
    from distill.args import EvalArgs

    res_t = evaluate(teacher="test_tiny_ensemble", val=EvalArgs(**sets), out=tmp_path / "t.json")
    res_s = evaluate(student="test_tiny", val=EvalArgs(**sets))
    for res in (res_t, res_s):
        assert res["zeroshot_n"] == 30 and res["retrieval_images"] == 16 and res["retrieval_captions"] == 80
        assert 0.0 <= res["zeroshot_top1"] <= 100.0 and 0.0 <= res["t2i_R@10"] <= 100.0
    assert json.loads((tmp_path / "t.json").read_text())["model"] == "test_tiny_ensemble"
    with pytest.raises(ValueError, match="exactly one"):
        evaluate()


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["rgba", "16bit", "palette"])
def test_eval_and_calibration_see_the_training_picture(tmp_path, kind):
    """`distill eval` decoded with PIL's convert("RGB"): a 16-bit PNG became a different (clipped) picture."""
    import numpy as np
    from PIL import Image

    from export.api import load_calibration_images
    from mcd_common.images import center_view, decode_image, to_uint8_tensor
    from reinforced_data import ImageTextDataset, resolve_inputs

    rng = np.random.default_rng(0)
    if kind == "16bit":
        img = Image.fromarray(rng.integers(0, 65535, size=(30, 40), dtype=np.uint16))
    elif kind == "rgba":
        img = Image.fromarray(rng.integers(0, 256, size=(30, 40, 4), dtype=np.uint8), "RGBA")
    else:
        img = Image.fromarray(rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)).convert("P")
    data = _png(img)
    train = to_uint8_tensor(center_view(decode_image(data), 16, "bilinear"))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(data)
    assert torch.equal(load_image(data, 16, "bilinear"), train)
    assert torch.equal(load_image(tmp_path / "imgs" / "a.png", 16, "bilinear"), train)
    (calib,) = load_calibration_images(tmp_path / "imgs", 16, count=1, interpolation="bilinear")
    assert torch.equal((calib[0] * 255).round().to(torch.uint8), train)
    (tmp_path / "caps.csv").write_text("image,caption\na.png,a picture\n")
    shards = resolve_inputs(tmp_path / "imgs", captions=tmp_path / "caps.csv")
    plain = ImageTextDataset(shards, lambda t: torch.zeros(len(t), 4), 16, "bilinear", None, seed=0)[(0, 0)]
    assert torch.equal(plain["image"], train)


def test_caption_tars_are_grouped_by_the_shared_rule(tmp_path):
    """Retrieval tars were grouped with partition(".") over the whole tar: a repeated key was merged away."""
    import io
    import tarfile

    from PIL import Image

    jpg = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(jpg, format="JPEG")
    members = [
        ("a.jpg", jpg.getvalue()),
        ("a.json", json.dumps({"captions": ["first a", "other a"]}).encode()),
        ("b.jpg", jpg.getvalue()),
        ("b.txt", b"only b"),
        ("a.jpg", jpg.getvalue()),  # the key "a" again, later in the tar: its own sample
        ("a.txt", b"second a"),
    ]
    with tarfile.open(tmp_path / "val.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cs = CaptionSet(tmp_path / "val.tar", 16)
    assert [cs[i]["captions"] for i in range(len(cs))] == [["first a", "other a"], ["only b"], ["second a"]]
    assert cs[2]["image"].shape == (3, 16, 16)


def _zs_folder(root, classes=("cat", "dog"), n=2):
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for k in range(n):
            Image.new("RGB", (20, 20), (40 * c + 10 * k, 100, 50)).save(root / name / f"{k}.png")
    return root


def test_zeroshot_dataset_root_instead_of_its_split_names_the_fix(tmp_path):
    """cifar10/ (holding test/<class>/) instead of cifar10/test raised ZeroDivisionError."""
    from distill.args import EvalArgs
    from mcd_common.errors import UsageError

    _zs_folder(tmp_path / "cifar" / "test")
    _zs_folder(tmp_path / "cifar" / "train")
    with pytest.raises(UsageError, match=r"holds splits \(test, train\).*--val.zeroshot .*cifar/test"):
        evaluate(teacher="test_tiny", val=EvalArgs(zeroshot=str(tmp_path / "cifar")))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(UsageError, match="hold no image"):
        ImageFolderSet(tmp_path / "empty", 16)


def test_a_corrupt_zeroshot_image_is_left_out_and_counted(tmp_path):
    from distill.args import EvalArgs

    root = _zs_folder(tmp_path / "zs")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    res = evaluate(teacher="test_tiny", val=EvalArgs(zeroshot=str(root)), out=tmp_path / "res.json")
    assert res["zeroshot_n"] == 4 and res["zeroshot_skipped"] == 1
    assert res["zeroshot_skipped_files"][0].startswith(str(root / "dog" / "broken.png"))
    assert json.loads((tmp_path / "res.json").read_text())["zeroshot_skipped"] == 1


def test_retrieval_without_a_split_file_warns_and_records_the_split(tmp_path, caplog):
    from PIL import Image

    from distill.args import EvalArgs

    (tmp_path / "images").mkdir()
    (tmp_path / "splits").mkdir()
    rows = ["image,caption"]
    for k in range(4):
        Image.new("RGB", (24, 24), (60 * k, 20, 90)).save(tmp_path / "images" / f"{k}.jpg")
        rows.append(f"{k}.jpg,photo {k}")
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "splits" / "train.txt").write_text("0.jpg\n1.jpg\n2.jpg\n")
    (tmp_path / "splits" / "test.txt").write_text("3.jpg\n")
    (tmp_path / "images" / "1.jpg").write_bytes(b"not a jpeg")  # one corrupt image: left out, counted
    with caplog.at_level("WARNING"):
        res = evaluate(teacher="test_tiny", val=EvalArgs(retrieval=str(tmp_path)))
    assert "training images included" in caplog.text and "splits/test.txt" in caplog.text
    assert res["retrieval_split"] == "all" and res["retrieval_images"] == 3 and res["retrieval_skipped"] == 1
    split = tmp_path / "splits" / "test.txt"
    res = evaluate(teacher="test_tiny", val=EvalArgs(retrieval=str(tmp_path), split_file=str(split)))
    assert res["retrieval_split"] == str(split) and res["retrieval_images"] == 1
