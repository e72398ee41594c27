"""Hugging Face export: a ``save_pretrained`` directory that ``transformers.CLIPModel`` loads offline.

Possible when both towers are ones ``transformers``' CLIP implements exactly: an open_clip native ViT image tower
(class-token pooling, no LayerScale, no attentional pooler) and a causal open_clip text transformer with argmax
(EOT) pooling (TinyCLIP-class students). MobileCLIP's MCi/FastViT image towers, the MCt text tower and CoCa
towers are refused with a message pointing to what loads them instead.

The directory holds ``config.json`` + ``model.safetensors`` (a `CLIPModel`) and a matching `CLIPProcessor`
(CLIP BPE tokenizer with the student's context length; image size, resize mode, interpolation, mean/std).

Key table (open_clip ``CustomTextCLIP`` -> transformers ``CLIPModel``), read from transformers 5.23
``modeling_clip.py`` and open_clip 3.3 ``transformer.py``; the reverse mapping for importing HF checkpoints
is written separately in ``students`` (to be unified):

=============================================  =========================================================
``visual.conv1.weight``                        ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                     ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre``                              ``vision_model.pre_layrnorm`` (sic)
``visual.ln_post``                             ``vision_model.post_layernorm``
``visual.proj`` `[W, D]`                       ``visual_projection.weight`` `[D, W]` (transposed)
``text.token_embedding.weight``                ``text_model.embeddings.token_embedding.weight``
``text.positional_embedding``                  ``text_model.embeddings.position_embedding.weight``
``text.ln_final``                              ``text_model.final_layer_norm``
``text.text_projection`` `[W, D]`              ``text_projection.weight`` `[D, W]` (transposed)
``*.transformer.resblocks.N.ln_1 / ln_2``      ``*.encoder.layers.N.layer_norm1 / layer_norm2``
``*.resblocks.N.attn.in_proj_*`` `[3W, ...]`   ``*.layers.N.self_attn.{q,k,v}_proj.*`` (split in three)
``*.resblocks.N.attn.out_proj``                ``*.layers.N.self_attn.out_proj``
``*.resblocks.N.mlp.c_fc / c_proj``            ``*.layers.N.mlp.fc1 / fc2``
``logit_scale``                                ``logit_scale``
=============================================  =========================================================

References: transformers ``CLIPModel`` / ``CLIPProcessor`` docs; open_clip ``convert.py`` (the opposite
direction, for the naming); TinyCLIP as a ``CLIPModel`` (microsoft/Cream#212).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import TextTransformer, VisionTransformer

from export import bundle
from export._quiet import captured_stderr
from export._report import ExportReport, parity, path_size
from mcd_common import UsageError
from mcd_common.files import atomic_path

if TYPE_CHECKING:  # transformers is imported lazily (heavy; `distill --help` stays light)
    from transformers import CLIPModel, CLIPProcessor

_logger = logging.getLogger(__name__)

__all__ = ["export_hf", "hf_features", "hf_state_dict", "hf_unsupported_reason", "load_hf", "require_hf_expressible"]


def hf_unsupported_reason(student: nn.Module) -> str | None:
    """Why ``transformers.CLIPModel`` cannot express ``student`` exactly, or None when it can."""
    visual, text = getattr(student, "visual", None), getattr(student, "text", None)
    if not isinstance(visual, VisionTransformer):
        return f"a {type(visual).__name__} image tower (MCi/FastViT/timm towers are not in transformers' CLIP)"
    if visual.attn_pool is not None:
        return "an attentional-pool (CoCa) image tower"
    if visual.pool_type != "tok" or visual.final_ln_after_pool or isinstance(visual.ln_pre, nn.Identity):
        return f"a ViT with pool_type={visual.pool_type!r} / final_ln_after_pool / no ln_pre"
    if visual.proj is None or visual.conv1.bias is not None:
        return "a ViT without projection or with a patch-embedding bias"
    if not isinstance(text, TextTransformer):
        return f"a {type(text).__name__} text tower (MCt is not in transformers' CLIP)"
    if text.cls_emb is not None or text.pool_type != "argmax" or text.attn_mask is None:
        return "a text tower that is not causal with EOT (argmax) pooling (CoCa CLS token or bidirectional)"
    if isinstance(text.text_projection, nn.Linear) and text.text_projection.bias is not None:
        return "a text projection with bias"
    for blk in (*visual.transformer.resblocks, *text.transformer.resblocks):
        if not (isinstance(blk.ls_1, nn.Identity) and isinstance(blk.ls_2, nn.Identity)):
            return "LayerScale in the transformer blocks"
        if getattr(blk, "ln_attn", nn.Identity()).__class__ is not nn.Identity:
            return "scaled-cosine / extra attention norms"
    return None


def require_hf_expressible(student: nn.Module, source: str) -> None:
    """Raise a `UsageError` saying what loads the student instead when transformers cannot express it.

    Args:
        student: The student.
        source: Its checkpoint (student directory), named in the message.
    """
    why = hf_unsupported_reason(student)
    if why is not None:
        raise UsageError(
            f"--format hf: the student has {why}, which transformers' CLIPModel cannot express; load the student "
            f"directory with open_clip instead (open_clip.create_model('local-dir:{source}'); MCt students: "
            "students.load_student), or use --format onnx/executorch/coreml"
        )


def _act_name(student: nn.Module) -> str:
    act = student.visual.transformer.resblocks[0].mlp.gelu
    return "quick_gelu" if type(act).__name__ == "QuickGELU" else "gelu"


def _clip_config(student: nn.Module):  # noqa: ANN202 - transformers.CLIPConfig (imported lazily)
    from transformers import CLIPConfig  # lazy: heavy optional dependency

    visual, text = student.visual, student.text
    v_blk, t_blk = visual.transformer.resblocks[0], text.transformer.resblocks[0]
    embed_dim = int(visual.proj.shape[1])
    act = _act_name(student)
    vision_config = {
        "hidden_size": int(visual.conv1.out_channels),
        "intermediate_size": int(v_blk.mlp.c_fc.out_features),
        "num_hidden_layers": len(visual.transformer.resblocks),
        "num_attention_heads": int(v_blk.attn.num_heads),
        "image_size": int(visual.image_size[0]),
        "patch_size": int(visual.patch_size[0]),
        "hidden_act": act,
        "layer_norm_eps": float(visual.ln_pre.eps),
        "projection_dim": embed_dim,
    }
    text_config = {
        "vocab_size": int(text.token_embedding.num_embeddings),
        "hidden_size": int(text.token_embedding.embedding_dim),
        "intermediate_size": int(t_blk.mlp.c_fc.out_features),
        "num_hidden_layers": len(text.transformer.resblocks),
        "num_attention_heads": int(t_blk.attn.num_heads),
        "max_position_embeddings": int(text.positional_embedding.shape[0]),
        "hidden_act": act,
        "layer_norm_eps": float(text.ln_final.eps),
        "projection_dim": embed_dim,
        # NOTE: the first EOT (49407) is the pooled token, as open_clip's argmax (EOT is the largest id)
        "bos_token_id": bundle.SOT_ID,
        "eos_token_id": bundle.EOT_ID,
        "pad_token_id": 0,
    }
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=embed_dim,
        logit_scale_init_value=float(student.logit_scale.detach()),
    )


def _blocks(prefix_in: str, prefix_out: str, sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(layers):
        a, b = f"{prefix_in}.transformer.resblocks.{i}", f"{prefix_out}.encoder.layers.{i}"
        for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1")):
            out[f"{b}.{theirs}.weight"], out[f"{b}.{theirs}.bias"] = sd[f"{a}.{ours}.weight"], sd[f"{a}.{ours}.bias"]
        out[f"{b}.mlp.fc2.weight"], out[f"{b}.mlp.fc2.bias"] = sd[f"{a}.mlp.c_proj.weight"], sd[f"{a}.mlp.c_proj.bias"]
        # packed [3W, W] / [3W] in q, k, v order (nn.MultiheadAttention)
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{a}.attn.in_proj_{kind}"].chunk(3, dim=0)
            for name, t in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{b}.self_attn.{name}.{kind}"] = t
            out[f"{b}.self_attn.out_proj.{kind}"] = sd[f"{a}.attn.out_proj.{kind}"]
    return out


def hf_state_dict(student: nn.Module) -> dict[str, torch.Tensor]:
    """The student's weights under ``transformers.CLIPModel`` keys (see the module's key table)."""
    sd = {k: v.detach().clone() for k, v in student.state_dict().items()}
    proj = student.text.text_projection
    text_proj = proj.weight.detach().clone() if isinstance(proj, nn.Linear) else sd["text.text_projection"].t()
    out = {
        "logit_scale": sd["logit_scale"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "visual_projection.weight": sd["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": sd["text.token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["text.positional_embedding"],
        "text_model.final_layer_norm.weight": sd["text.ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["text.ln_final.bias"],
        "text_projection.weight": text_proj,
    }
    out |= _blocks("visual", "vision_model", sd, len(student.visual.transformer.resblocks))
    out |= _blocks("text", "text_model", sd, len(student.text.transformer.resblocks))
    return {k: v.contiguous() for k, v in out.items()}


def _processor(student: nn.Module, meta: dict[str, object], work: Path) -> CLIPProcessor:
    """A `CLIPProcessor` with the student's preprocessing and the CLIP BPE tokenizer files of the app bundle."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer  # lazy: heavy optional dependency

    size = int(meta["image_size"])
    entry = bundle.write_tokenizer_files(work)
    tokenizer = CLIPTokenizer(
        vocab=str(work / entry["vocab"]), merges=str(work / entry["merges"]), model_max_length=meta["context_length"]
    )
    cfg = getattr(student, "cfg", None)
    resize_mode = getattr(getattr(cfg, "image", None), "resize_mode", "shortest")
    squash = resize_mode == "squash"
    if resize_mode == "longest":
        _logger.warning("hf: CLIPImageProcessor cannot pad (resize_mode 'longest'); it resizes the shortest side")
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": size, "width": size} if squash else {"shortest_edge": size},
        resample=3 if getattr(student, "interpolation", "bicubic") == "bicubic" else 2,  # PIL BICUBIC / BILINEAR
        do_center_crop=not squash,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(meta["mean"]),
        image_std=list(meta["std"]),
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_hf(path: Path) -> CLIPModel:
    """``CLIPModel.from_pretrained(path)`` offline (local files only), in eval mode."""
    from transformers import CLIPModel  # lazy: heavy optional dependency

    return CLIPModel.from_pretrained(str(path), local_files_only=True).eval()


def hf_features(model: CLIPModel, tower: str, x: torch.Tensor, student: nn.Module | None = None) -> torch.Tensor:
    """Unnormalised features `[B, D]`: pixels in [0, 1] (normalised here with the student's mean/std) or tokens."""
    with torch.no_grad():
        if tower == "image":
            pixels = student.normalize(x) if student is not None else x
            return model.get_image_features(pixel_values=pixels).pooler_output
        return model.get_text_features(input_ids=x.long()).pooler_output


def export_hf(
    student: nn.Module,
    path: Path,
    *,
    meta: dict[str, object],
    check_inputs: dict[str, list[tuple[torch.Tensor, ...]]],
    source: str,
    min_cosine: float = 0.999,
) -> list[ExportReport]:
    """Write ``path`` (a `CLIPModel` + `CLIPProcessor` directory), reload it offline and compare both towers.

    Args:
        student: A ``students.CLIPStudent`` (not modified).
        path: Output directory (replaced atomically).
        meta: `export.prepare.student_meta` of the student.
        check_inputs: ``{"image": [(x,)], "text": [(tokens,)]}`` fixed parity inputs.
        source: The student directory, named in the refusal message.
        min_cosine: Threshold for ``passed``.

    Returns:
        One report per tower (both name the directory).

    Raises:
        UsageError: When transformers cannot express the student (see `hf_unsupported_reason`).
    """
    from transformers import CLIPModel  # lazy: heavy optional dependency

    require_hf_expressible(student, source)
    t0 = time.perf_counter()
    path = Path(path)
    model = CLIPModel(_clip_config(student)).eval()
    missing, unexpected = model.load_state_dict(hf_state_dict(student), strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"hf key table out of date: missing {missing}, unexpected {unexpected}")
    # transformers draws tqdm bars for writing/loading shards on stderr
    with tempfile.TemporaryDirectory() as work, atomic_path(path) as tmp, captured_stderr("transformers"):
        model.save_pretrained(str(tmp), safe_serialization=True)
        _processor(student, meta, Path(work)).save_pretrained(str(tmp))
    with captured_stderr("transformers"):
        reloaded = load_hf(path)
    reports = []
    for tower, encode in (("image", student.encode_image), ("text", student.encode_text)):
        report = ExportReport(path=path, format="hf", tower=tower, backend="transformers", precision="fp32")
        x = torch.cat([t[0] for t in check_inputs[tower]])
        with torch.no_grad():
            want = encode(student.normalize(x) if tower == "image" else x.long(), normalize=False)
        got = hf_features(reloaded, tower, x, student)
        report.max_abs_diff = float((want - got).abs().max())
        _, report.cosine = parity(F.normalize(want, dim=-1), F.normalize(got, dim=-1))
        report.checked_with = "transformers (offline from_pretrained)"
        report.passed = report.cosine >= min_cosine
        report.file_size = path_size(path)
        report.seconds = time.perf_counter() - t0
        reports.append(report)
    _logger.info("hf -> %s (%.1f MB, cosine %s)", path.name, reports[0].file_size / 1e6, [r.cosine for r in reports])
    return reports
