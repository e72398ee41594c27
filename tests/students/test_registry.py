"""Registry behaviour, weight specs (local files and offline hub errors) and parameter counts."""

from __future__ import annotations

import pytest
import torch

import students
from mcd_common import UnknownNameError, UsageError
from students import WeightSpec, create_student, get_student_cfg, list_students, register_student, save_student
from students.towers import CLIPStudent


def test_list_students() -> None:
    names = list_students()
    for name in ("mobileclip_s0", "mobileclip2_s4", "tinyclip_vit_8m_16_text_3m", "test_tiny", "tiny_vit_s"):
        assert name in names
    assert list_students("mobileclip2_*") == [n for n in names if n.startswith("mobileclip2_")]
    assert "mobileclip2_s0.dfndr2b" in list_students(pretrained=True)
    assert "mobileclip2_s0.dfndr2b" not in names


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(UnknownNameError, match="mobileclip_s0"):
        create_student("mobileclip_s00")
    with pytest.raises(UnknownNameError, match="dfndr2b"):
        create_student("mobileclip2_s0.nope")


def test_duplicate_registration_raises() -> None:
    def test_tiny():  # noqa: ANN202 - same name as a registered variant
        raise AssertionError

    with pytest.raises(ValueError, match="already registered"):
        register_student(test_tiny)


def test_overrides_and_none_dropped(tiny_batch) -> None:  # noqa: ANN001
    student = create_student("test_tiny", image_size=64, context_length=None, embed_dim=24)
    assert student.image_size == 64 and student.context_length == 16 and student.embed_dim == 24
    images, tokens = tiny_batch(student)
    out = student(image=images, text=tokens)
    assert out["image_features"].shape == (3, 24)


def test_get_student_cfg_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def _no_build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("get_student_cfg must not build a model")

    monkeypatch.setattr(CLIPStudent, "__init__", _no_build)
    cfg = get_student_cfg("mobileclip2_s4", image_size=128)
    assert cfg.embed_dim == 768 and cfg.image.image_size == 128 and cfg.image.timm_model_name == "fastvit_mci4"


def test_weights_from_files(tiny_student, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    images, tokens = tiny_batch(tiny_student)
    expected = tiny_student(image=images, text=tokens)
    save_student(tiny_student, tmp_path / "dir")
    torch.save(tiny_student.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {"student." + k: v for k, v in tiny_student.state_dict().items()}}, tmp_path / "l.ckpt")
    for source in (tmp_path / "dir", tmp_path / "dir" / "open_clip_model.safetensors", tmp_path / "plain.pt",
                   tmp_path / "l.ckpt"):  # fmt: skip
        student = create_student("test_tiny", weights=WeightSpec(file=str(source))).eval()
        out = student(image=images, text=tokens)
        assert torch.equal(out["image_features"], expected["image_features"]), source
        assert torch.equal(out["text_features"], expected["text_features"]), source


def test_weights_that_do_not_fit_raise(tiny_student, tmp_path) -> None:  # noqa: ANN001
    save_student(tiny_student, tmp_path)
    with pytest.raises(ValueError, match="shape mismatch"):
        create_student("test_tiny", embed_dim=16, weights=WeightSpec(file=str(tmp_path)))
    with pytest.raises(UsageError, match="no such file"):
        create_student("test_tiny", weights=WeightSpec(file=str(tmp_path / "missing.safetensors")))


def test_local_dir_name(tiny_student, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    save_student(tiny_student, tmp_path)
    images, tokens = tiny_batch(tiny_student)
    loaded = create_student("local-dir:" + str(tmp_path))
    assert torch.equal(loaded.encode_image(images), tiny_student.encode_image(images))
    assert get_student_cfg("local-dir:" + str(tmp_path)) == tiny_student.cfg
    with pytest.raises(ValueError, match="local-dir"):
        create_student("local-dir:" + str(tmp_path), image_size=64)


def test_offline_hub_and_url_fail_with_the_local_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="--student_weights") as err:
        create_student("mobileclip2_s0.dfndr2b")  # the tag's hub weights; fails before building the model
    assert "local-dir:" in str(err.value)
    with pytest.raises(RuntimeError, match="WeightSpec\\(file=PATH\\)"):
        create_student("test_tiny", weights=WeightSpec(url="https://example.invalid/never/weights.safetensors"))
    with pytest.raises(ValueError, match="empty"):
        create_student("test_tiny", weights=WeightSpec())


def _counts(name: str) -> tuple[float, float, float]:
    with torch.device("meta"):
        student = create_student(name)
    c = student.param_counts()
    tok = student.text.token_embedding.weight.numel()
    return c["image"] / 1e6, c["text"] / 1e6, (c["text"] - tok) / 1e6


@pytest.mark.parametrize(
    ("name", "image_m", "text_m"),
    [("mobileclip_s0", 11.41, 42.44), ("mobileclip2_s0", 11.41, 63.43), ("mobileclip_b", 86.35, 63.43),
     ("mobileclip2_s3", 125.24, 123.65)],
)  # fmt: skip
def test_mobileclip_parameter_counts(name: str, image_m: float, text_m: float) -> None:
    image, text, _ = _counts(name)
    assert image == pytest.approx(image_m, abs=0.006)
    assert text == pytest.approx(text_m, abs=0.006)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "image_m", "text_m"),
    [("mobileclip_s1", 21.54, 63.43), ("mobileclip_s2", 35.82, 63.43), ("mobileclip2_s2", 35.82, 63.43),
     ("mobileclip2_b", 86.35, 63.43), ("mobileclip2_s4", 321.78, 123.65)],
)  # fmt: skip
def test_mobileclip_parameter_counts_all(name: str, image_m: float, text_m: float) -> None:
    image, text, _ = _counts(name)
    assert image == pytest.approx(image_m, abs=0.006)
    assert text == pytest.approx(text_m, abs=0.006)


@pytest.mark.parametrize(
    ("name", "image_m", "text_excl_m"),
    [("tinyclip_vit_8m_16_text_3m", 8.28, 2.52), ("tinyclip_vit_39m_16_text_19m", 38.59, 19.22),
     ("tinyclip_vit_40m_32_text_19m", 39.69, 19.22), ("tinyclip_vit_61m_32_text_29m", 61.41, 28.67)],
)  # fmt: skip
def test_tinyclip_parameter_counts(name: str, image_m: float, text_excl_m: float) -> None:
    image, _, text_excl = _counts(name)
    assert image == pytest.approx(image_m, rel=0.01)
    assert text_excl == pytest.approx(text_excl_m, rel=0.01)


def test_tiny_variants_run(tiny_batch) -> None:  # noqa: ANN001
    for name in ("test_tiny_mct", "tiny_vit_s", "tiny_mci"):  # tiny_mci: timm fastvit_t8 at 64 px
        student = create_student(name).eval()
        images, tokens = tiny_batch(student, 2)
        with torch.no_grad():
            out = student(image=images, text=tokens)
        assert out["image_features"].shape == out["text_features"].shape == (2, student.embed_dim)
    assert students.get_student_cfg("tiny_vit").image.mean == students.OPENAI_MEAN
