"""The published teachers and captioners registered by name: the real checkpoints (hub weights) and tiny test models.

Real entries need their weights from the Hugging Face Hub (or the open_clip URLs), so offline they are listed by
``distill zoo`` and loadable only with a local file (``--teacher_weights PATH``) or directory (``local-dir:``).
Preprocessing values are those of open_clip's pretrained tags (``src/open_clip/pretrained.py``). Ensembles and their
KD logit scales follow apple/ml-mobileclip: v1 ``ViT-L-14,ViT-L-14`` ``openai,datacomp_xl_s13b_b90k`` at 100 each,
v2 the two ``apple/DFN2B-CLIP-ViT-L-14[-39B]`` models at 70 and 60.

Tiny entries (``test_tiny*``) use the open_clip configs in ``teachers/configs/`` with deterministic random weights
(``allow_random``); real entries never fall back to random weights.
"""

from __future__ import annotations

from .registry import CaptionerCfg, TeacherCfg, WeightSpec, register_captioner, register_teacher

__all__: list[str] = []

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


def _clip(name: str, arch: str, pretrained: str, **kw: object) -> TeacherCfg:
    kw = {"image_size": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic", **kw}
    return register_teacher(TeacherCfg(name=name, source="open_clip", arch=arch, pretrained=pretrained, **kw))


# --- single teachers ---------------------------------------------------------------------------------------------
# NOTE: OpenAI and DFN2B (5B-sample) checkpoints were trained with QuickGELU, hence the -quickgelu architectures.
# KD logit scales: MobileCLIP's (v1 100 for both L/14 teachers, v2 70 and 60); the others take the default (50).
_clip("vit_l14.openai", "ViT-L-14-quickgelu", "openai", logit_scale=100.0)
_clip("vit_l14.datacomp_xl", "ViT-L-14", "datacomp_xl_s13b_b90k", logit_scale=100.0)
_dfn2b = WeightSpec(hf_hub="apple/DFN2B-CLIP-ViT-L-14/")
_clip("vit_l14.dfn2b", "ViT-L-14-quickgelu", "dfn2b", weights=_dfn2b, logit_scale=70.0)
_dfn2b_39b = WeightSpec(hf_hub="apple/DFN2B-CLIP-ViT-L-14-39B/")
_clip("vit_l14.dfn2b_39b", "ViT-L-14", "dfn2b_s39b", weights=_dfn2b_39b, logit_scale=60.0)
_clip("vit_b16.openai", "ViT-B-16-quickgelu", "openai")
_clip("vit_b32.laion2b", "ViT-B-32", "laion2b_s34b_b79k")
_clip("siglip_b16.webli", "ViT-B-16-SigLIP", "webli", mean=HALF, std=HALF)
register_teacher(TeacherCfg(name="hf.clip_vit_b32", source="hf", arch="openai/clip-vit-base-patch32"))

# --- ensembles (members in embedding slice order) ----------------------------------------------------------------
register_teacher(
    TeacherCfg(
        name="ensemble_l14x2",
        source="ensemble",
        members=("vit_l14.openai", "vit_l14.datacomp_xl"),
        member_logit_scales=(100.0, 100.0),
    )
)
register_teacher(
    TeacherCfg(
        name="ensemble_dfn2b_l14x2",
        source="ensemble",
        members=("vit_l14.dfn2b", "vit_l14.dfn2b_39b"),
        member_logit_scales=(70.0, 60.0),
    )
)

# --- tiny test teachers (32 px / embed 32 and 48 px / embed 48, 2 layers) ---------------------------------------
register_teacher(TeacherCfg(name="test_tiny", source="open_clip", arch="test-tiny-clip", allow_random=True))
register_teacher(
    TeacherCfg(
        name="test_tiny_b",
        source="open_clip",
        arch="test-tiny-clip-b",
        mean=HALF,
        std=HALF,
        interpolation="bilinear",
        allow_random=True,
    )
)
register_teacher(TeacherCfg(name="test_tiny_ensemble", source="ensemble", members=("test_tiny", "test_tiny_b")))

# --- captioners ----------------------------------------------------------------------------------------------------
register_captioner(
    CaptionerCfg(
        name="coca_vit_l14.mscoco",
        source="open_clip",
        arch="coca_ViT-L-14",
        pretrained="mscoco_finetuned_laion2B-s13B-b90k",
        image_size=224,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        interpolation="bicubic",
    )
)
register_captioner(
    CaptionerCfg(name="blip_base", source="hf", arch="Salesforce/blip-image-captioning-base", tag="blip")
)
register_captioner(CaptionerCfg(name="git_base_coco", source="hf", arch="microsoft/git-base-coco", tag="git"))
register_captioner(CaptionerCfg(name="test_tiny_coca", source="open_clip", arch="test-tiny-coca", allow_random=True))
