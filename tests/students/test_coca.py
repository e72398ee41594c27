"""CoCa students: config round trips, open_clip `CoCa` parity (local-dir), caption loss, gradients, overfitting."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.coca_model import CoCa
from open_clip.loss import CoCaLoss
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import students
from students import CLIPStudent, CoCaStudent, StudentCfg, TextDecoderCfg
from students.coca import _decoder_hidden

# the multimodal_cfg fields open_clip's `_build_text_decoder_tower` reads (the others never reach the model)
_DECODER_FIELDS = ("context_length", "vocab_size", "width", "heads", "layers", "ls_init_value")


@pytest.fixture
def coca(perturb) -> CoCaStudent:  # noqa: ANN001
    """A `test_tiny_coca` student with perturbed ("trained") weights, in eval mode."""
    torch.manual_seed(0)
    return perturb(students.create_student("test_tiny_coca")).eval()


def _open_clip_coca(cfg: StudentCfg) -> CoCa:
    model_cfg = cfg.open_clip_model_cfg()
    model_cfg.pop("custom_text")
    return CoCa(**model_cfg)


def _naive_caption_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of every non-padding next token, one term at a time."""
    labels = tokens[:, 1:]
    terms = [
        -logits[b, t].double().log_softmax(-1)[labels[b, t]]
        for b in range(labels.shape[0])
        for t in range(labels.shape[1])
        if labels[b, t] != 0
    ]
    return torch.stack(terms).mean()


def test_list_students_lists_coca() -> None:
    assert students.list_students("*coca*") == ["test_tiny_coca", "tiny_coca"]


def test_cfg_round_trips() -> None:
    for name in ("test_tiny_coca", "tiny_coca"):
        cfg = students.get_student_cfg(name)
        assert isinstance(cfg.multimodal, TextDecoderCfg)
        assert StudentCfg.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        back = StudentCfg.from_open_clip(cfg.open_clip_model_cfg(), cfg.open_clip_preprocess_cfg(), name=name)
        assert back == cfg
        model_cfg = cfg.open_clip_model_cfg()
        assert model_cfg["vision_cfg"]["output_tokens"] and model_cfg["text_cfg"]["output_tokens"]
        assert model_cfg["multimodal_cfg"]["context_length"] == cfg.text.context_length
    # plain students: no decoder, and open_clip configs without any CoCa key
    plain = students.get_student_cfg("test_tiny")
    assert plain.multimodal is None and plain.to_dict()["multimodal"] is None
    assert StudentCfg.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    plain_oc = plain.open_clip_model_cfg()
    assert "multimodal_cfg" not in plain_oc
    assert not {"output_tokens", "attentional_pool"} & set(plain_oc["vision_cfg"])
    assert not {"output_tokens", "embed_cls"} & set(plain_oc["text_cfg"])


@pytest.mark.parametrize("arch", ["coca_ViT-B-32", "coca_ViT-L-14"])
def test_from_open_clip_reads_builtin_coca_configs(arch: str) -> None:
    theirs = open_clip.get_model_config(arch)
    ours = StudentCfg.from_open_clip(theirs).open_clip_model_cfg()
    assert ours["embed_dim"] == theirs["embed_dim"]
    assert CLIPVisionCfg(**ours["vision_cfg"]) == CLIPVisionCfg(**theirs["vision_cfg"])
    assert CLIPTextCfg(**ours["text_cfg"]) == CLIPTextCfg(**theirs["text_cfg"])
    ours_m = CLIPTextCfg(**ours["multimodal_cfg"])
    theirs_m = CLIPTextCfg(**{k: v for k, v in theirs["multimodal_cfg"].items() if k != "attn_pooler_heads"})
    assert all(getattr(ours_m, k) == getattr(theirs_m, k) for k in _DECODER_FIELDS)


def test_cfg_overrides_and_validation() -> None:
    cfg = students.get_student_cfg("test_tiny_coca", decoder_layers=3, context_length=8)
    assert cfg.multimodal.layers == 3
    assert cfg.open_clip_model_cfg()["multimodal_cfg"]["context_length"] == 8
    with pytest.raises(ValueError, match="must be equal"):
        students.get_student_cfg("test_tiny_coca", embed_dim=16)
    with pytest.raises(ValueError, match="no text decoder"):
        students.get_student_cfg("test_tiny", decoder_layers=1)
    with pytest.raises(ValueError, match="attentional_pool"):
        students.get_student_cfg("test_tiny_coca", attentional_pool=False)
    data = students.get_student_cfg("test_tiny_coca").to_dict()
    data["multimodal"]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        StudentCfg.from_dict(data)
    bad = students.get_student_cfg("test_tiny_coca").open_clip_model_cfg()
    bad["multimodal_cfg"]["context_length"] = 99
    with pytest.raises(ValueError, match="context_length"):
        StudentCfg.from_open_clip(bad)


def test_module_layout_and_state_dict_match_open_clip_coca() -> None:
    for name in ("test_tiny_coca", "tiny_coca"):
        cfg = students.get_student_cfg(name)
        with torch.device("meta"):  # shapes only: no time spent initialising
            ours, reference = students.build_student(cfg), _open_clip_coca(cfg)
        assert type(ours) is CoCaStudent and ours.caption_loss_enabled
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()
        }
        assert {n for n, _ in ours.named_children()} == {n for n, _ in reference.named_children()}
        assert type(ours.visual.attn_pool) is type(reference.visual.attn_pool)
        assert ours.text.cls_emb is not None
    assert not students.create_student("test_tiny").caption_loss_enabled
    with pytest.raises(ValueError, match="not a CoCa"):
        CoCaStudent(students.get_student_cfg("test_tiny"))
    # the factory chooses the class: a plain CLIPStudent refuses a config whose decoder it would drop
    with pytest.raises(ValueError, match="build_student"), torch.device("meta"):
        CLIPStudent(students.get_student_cfg("test_tiny_coca"))


def test_student_interface(coca: CoCaStudent, tiny_batch) -> None:  # noqa: ANN001
    images, tokens = tiny_batch(coca)
    assert tokens.shape == (3, coca.context_length) and coca.image_size == 32
    out = coca(images, tokens)
    assert torch.equal(out["image_features"], coca.encode_image(images))
    assert torch.equal(out["text_features"], coca.encode_text(tokens))
    assert out["image_features"].shape == (3, 32)
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))
    clone = copy.deepcopy(coca)
    assert type(clone) is CoCaStudent and clone.reparameterize() is clone
    assert torch.equal(clone.caption_logits(images, tokens), coca.caption_logits(images, tokens))
    assert set(coca.param_counts()) == {"image", "text", "decoder", "total"}


def test_open_clip_local_dir_round_trip(coca: CoCaStudent, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    images, tokens = tiny_batch(coca)
    students.save_student(coca, tmp_path)
    model = open_clip.create_model("local-dir:" + str(tmp_path)).eval()
    assert type(model) is CoCa
    assert torch.equal(open_clip.get_tokenizer("local-dir:" + str(tmp_path))(["a photo of a dog"]), tokens[:1])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), coca.encode_image(images))
        assert torch.equal(model.encode_text(tokens), coca.encode_text(tokens))
        theirs = model(images, tokens)
        assert torch.equal(theirs["labels"], tokens[:, 1:])
        assert torch.equal(theirs["logits"], coca.caption_logits(images, tokens))
        loaded = students.load_student(tmp_path)
        assert type(loaded) is CoCaStudent and loaded.cfg == coca.cfg
        assert torch.equal(loaded.encode_image(images), coca.encode_image(images))
        assert torch.equal(loaded.caption_logits(images, tokens), theirs["logits"])
        # a plain open_clip CoCa directory (no `distill` section) reads back through StudentCfg.from_open_clip
        config = json.loads((tmp_path / "open_clip_config.json").read_text())
        del config["distill"]
        (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
        assert students.load_student(tmp_path).cfg.with_overrides(name=coca.cfg.name) == coca.cfg


def test_forward_train_matches_open_clip_coca_loss(coca: CoCaStudent, tiny_batch) -> None:  # noqa: ANN001
    images, tokens = tiny_batch(coca)
    calls = {"visual": 0, "text": 0}
    hooks = [
        getattr(coca, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        for name in calls
    ]
    with torch.no_grad():
        out = coca.forward_train(images, tokens)
    for hook in hooks:
        hook.remove()
    assert calls == {"visual": 1, "text": 1}  # one pass of each tower
    with torch.no_grad():
        assert torch.equal(out["image_features"], coca.encode_image(images))
        assert torch.equal(out["text_features"], coca.encode_text(tokens))
        assert torch.equal(out["logit_scale"], coca.logit_scale.exp())
        logits = coca.caption_logits(images, tokens)
        reference = CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0)(
            out["image_features"], out["text_features"], logits, tokens[:, 1:], out["logit_scale"], output_dict=True
        )["caption_loss"]
    assert out["caption_loss"].dtype == torch.float32 and out["caption_loss"].ndim == 0
    torch.testing.assert_close(out["caption_loss"], reference)
    torch.testing.assert_close(out["caption_loss"].double(), _naive_caption_loss(logits, tokens))
    # open_clip's gradient-checkpointed decoder path computes the same loss
    coca.text_decoder.grad_checkpointing = True
    torch.testing.assert_close(coca.forward_train(images, tokens)["caption_loss"], reference)


def test_decoder_hidden_matches_open_clip_decoder(coca: CoCaStudent, tiny_batch) -> None:  # noqa: ANN001
    images, tokens = tiny_batch(coca)
    with torch.no_grad():
        _, image_embs = coca._encode_image(images)
        _, token_embs = coca._encode_text(tokens)
        decoder = coca.text_decoder
        hidden = _decoder_hidden(decoder, image_embs, token_embs[:, :-1])
        assert torch.equal(decoder.ln_final(hidden) @ decoder.text_projection, decoder(image_embs, token_embs[:, :-1]))


def test_caption_loss_without_targets_is_zero(coca: CoCaStudent, tiny_batch) -> None:  # noqa: ANN001
    images, _ = tiny_batch(coca, n=2)
    tokens = torch.zeros(2, coca.context_length, dtype=torch.long)
    tokens[:, 0] = 49406  # start token, then only padding: nothing to predict
    out = coca.train().forward_train(images, tokens)
    assert out["caption_loss"].item() == 0.0
    out["caption_loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in coca.parameters() if p.grad is not None)


def test_gradients_reach_decoder_and_both_towers(coca: CoCaStudent, tiny_batch) -> None:  # noqa: ANN001
    images, tokens = tiny_batch(coca)
    coca.train().forward_train(images, tokens)["caption_loss"].backward()
    for name in (
        "text_decoder.text_projection",
        "text_decoder.resblocks.0.attn.in_proj_weight",
        "text_decoder.cross_attn.0.attn.in_proj_weight",
        "visual.conv1.weight",
        "visual.attn_pool.query",
        "text.token_embedding.weight",
        "text.transformer.resblocks.0.mlp.c_fc.weight",
    ):
        grad = coca.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # with a contrastive term as well, every parameter trains
    coca.zero_grad()
    out = coca.forward_train(images, tokens)
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    contrastive = F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))
    (contrastive + out["caption_loss"]).backward()
    assert [n for n, p in coca.named_parameters() if p.grad is None] == []


def test_caption_loss_overfits_one_batch(tiny_batch) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    student = students.create_student("test_tiny_coca").train()
    images, tokens = tiny_batch(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = student.forward_train(images, tokens)["caption_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses  # ln(49408) = 10.8 at initialisation
