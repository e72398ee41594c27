"""`DistillModule` on its own: the batched text forward, the strict batch -> loss mapping, the pruning contract."""

import pytest
import torch

from distill.args import OptimArgs
from distill.losses import DistillLoss
from distill.module import DistillModule
from students import create_student


def _module(student="test_tiny", **loss_kw):
    torch.manual_seed(0)
    model = create_student(student)
    loss = DistillLoss(**({"contrastive_weight": 0.0, "kd_weight": 1.0, "teacher_logit_scales": {"t": 50.0}} | loss_kw))
    return DistillModule(model, None, loss, OptimArgs(), max_steps=10)


def _batch(model, b=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = model.tokenize([f"a photo of shape {i}" for i in range(b)])
    syn = model.tokenize([f"a drawing of {i} things in a row" for i in range(b)])
    feats = lambda: {"t": torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=-1)}  # noqa: E731
    return {
        "image": torch.randint(0, 255, (b, 3, 32, 32), dtype=torch.uint8, generator=g),
        "text": tokens,
        "syn_text": syn,
        "teacher_image_features": feats(),
        "teacher_text_features": feats(),
        "teacher_syn_text_features": feats(),
    }


@pytest.mark.parametrize("student", ["test_tiny", "test_tiny_mct"])
def test_real_and_synthetic_captions_share_one_text_forward_with_the_same_numbers(student):
    module = _module(student)
    if student == "test_tiny_mct":
        # NOTE: MCt's RepMixer blocks hold BatchNorm: in training mode its statistics cover all 2B captions, as in
        # ml-mobileclip-dr's cat([texts, syn_texts]); per-row equality with separate passes holds in eval mode.
        module.eval()
    batch = _batch(module.student)
    calls = []
    hook = module.student.text.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    out = module(batch["image"], batch["text"], batch["syn_text"])
    hook.remove()
    assert calls == [8], "one text-tower pass over the 2B captions"
    alone = module.student.encode_text(batch["text"], normalize=True)
    syn_alone = module.student.encode_text(batch["syn_text"], normalize=True)
    torch.testing.assert_close(out["text_features"], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["syn_text_features"], syn_alone, rtol=1e-5, atol=1e-6)


def test_training_computes_text_only_up_to_the_longest_caption():
    module = _module()
    batch = _batch(module.student)
    longest = int((torch.cat([batch["text"], batch["syn_text"]]) != 0).sum(1).max())
    seen = []
    hook = module.student.text.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    assert module.training_step(batch, 0).isfinite()
    hook.remove()
    assert seen == [longest] and longest < module.student.context_length


def test_adamw_is_fused_except_under_mixed_precision():
    import types

    module = _module()
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True  # CPU too: one kernel per step
    for precision in ("16-mixed", "bf16-mixed"):  # Lightning's amp plugin refuses clipping with a fused optimizer
        module._trainer = types.SimpleNamespace(precision=precision, global_step=0)
        assert not module.configure_optimizers()["optimizer"].defaults["fused"]
    module._trainer = types.SimpleNamespace(precision="bf16-true", global_step=0)
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True


def test_mixed_precision_with_gradient_clipping_trains(tmp_path, tiny_corpus):
    from distill.cli import main

    argv = [
        "train", "--student", "test_tiny", "--data.path", str(tiny_corpus / "train"), "--data.batch_size", "8",
        "--data.num_workers", "0", "--trainer.max_steps", "2", "--trainer.precision", "bf16-mixed",
        "--trainer.gradient_clip_val", "1.0", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false", "--val.zeroshot", "null", "--val.retrieval", "null",
    ]  # fmt: skip
    assert main(argv) == 0


def test_a_misspelt_target_key_in_the_batch_raises():
    module = _module()
    batch = _batch(module.student)
    assert module.training_step(batch, 0).isfinite()
    batch["teacher_syn_text_feature"] = batch.pop("teacher_syn_text_features")
    with pytest.raises(TypeError, match="teacher_syn_text_feature"):
        module.training_step(batch, 0)


def test_pruning_contract_is_declared_on_the_module():
    module = _module()
    assert module.pruner is None  # a declared attribute, not one a callback may or may not have set
    smaller = create_student("test_tiny_mct")
    module.replace_student(smaller)
    assert module.student is smaller and module.pruner is None
    assert module.hparams["student_cfg"] == smaller.cfg.to_dict()
