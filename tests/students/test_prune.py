"""L0 hard-concrete pruning: masks, sparsity estimate, Lagrangian and exact pruning."""

from __future__ import annotations

import pytest
import torch

import students
from students import L0Pruner


def _features(student, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    with torch.no_grad():
        out = student(image=images, text=tokens)
    return out["image_features"], out["text_features"]


def _force(pruner: L0Pruner, seed: int = 1) -> dict[str, tuple[int, int, int]]:
    """Gates hard open (+50) or closed (-50): a third of the heads and half of the neurons per layer closed."""
    gen = torch.Generator().manual_seed(seed)
    kept = {}
    with torch.no_grad():
        for tower, s in pruner.shapes.items():
            drop_heads = max(1, s.heads // 3)
            heads = pruner.log_alpha[f"{tower}_heads"].fill_(50.0)
            mlp = pruner.log_alpha[f"{tower}_mlp"].fill_(50.0)
            for layer in range(s.layers):
                heads[layer, torch.randperm(s.heads, generator=gen)[:drop_heads]] = -50.0
                mlp[layer, torch.randperm(s.mlp, generator=gen)[: s.mlp // 2]] = -50.0
            width = (s.heads - drop_heads) * s.head_dim  # open_clip ties width to heads x head_dim
            hidden = pruner.log_alpha[f"{tower}_hidden"].fill_(-50.0)
            hidden[torch.randperm(s.width, generator=gen)[:width]] = 50.0
            kept[tower] = (width, s.heads - drop_heads, s.mlp - s.mlp // 2)
    return kept


def test_fully_open_masks_change_nothing(perturb, tiny_batch) -> None:  # noqa: ANN001
    student = perturb(students.create_student("tiny_vit_s")).eval()
    images, tokens = tiny_batch(student)
    reference = _features(student, images, tokens)
    pruner = L0Pruner(student, target_sparsity=0.5, tolerance=None)  # follow the masks: all open, nothing cut
    got = _features(student, images, tokens)  # eval: deterministic gates at init (~1)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        for p in pruner.parameters():
            p.fill_(30.0)  # sampled gates are then exactly 1
    student.train()
    got = _features(student, images, tokens)
    for a, b in zip(got, reference, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    pruner.detach()
    student.eval()
    assert all(torch.equal(a, b) for a, b in zip(_features(student, images, tokens), reference, strict=True))


def test_prune_at_forced_mask_equals_masked_and_sliced_model(perturb, tiny_batch) -> None:  # noqa: ANN001
    student = perturb(students.create_student("tiny_vit_s")).eval()
    images, tokens = tiny_batch(student)
    original = {k: v.clone() for k, v in student.state_dict().items()}
    pruner = L0Pruner(student, target_sparsity=0.5, tolerance=None)
    kept = _force(pruner)
    masked = _features(student, images, tokens)
    pruned = pruner.prune().eval()
    assert pruned.cfg.image.width == kept["image"][0] and pruned.cfg.text.heads == kept["text"][1]
    assert pruned.visual.transformer.resblocks[0].mlp.c_fc.out_features == kept["image"][2]
    got = _features(pruned, images, tokens)
    for a, b in zip(got, masked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the weights are plain index slices of the original (gate values are exactly 1 at +50)
    plan = pruner.plan("image")
    hid, heads, mlp = plan.hidden, plan.heads[1], plan.mlp[1]
    hd = pruner.shapes["image"].head_dim
    rows = torch.cat([(heads[:, None] * hd + torch.arange(hd)).flatten() + j * 96 for j in range(3)])
    w = original["visual.transformer.resblocks.1.attn.in_proj_weight"][rows][:, hid]
    assert torch.equal(pruned.state_dict()["visual.transformer.resblocks.1.attn.in_proj_weight"], w)
    w = original["visual.transformer.resblocks.1.mlp.c_proj.weight"][hid][:, mlp]
    assert torch.equal(pruned.state_dict()["visual.transformer.resblocks.1.mlp.c_proj.weight"], w)
    assert torch.equal(pruned.state_dict()["text.token_embedding.weight"],
                       original["text.token_embedding.weight"][:, pruner.plan("text").hidden])  # fmt: skip


def test_pruned_student_is_a_plain_open_clip_config(perturb, tiny_batch, tmp_path) -> None:  # noqa: ANN001
    import open_clip

    student = perturb(students.create_student("tiny_vit_s")).eval()
    pruner = L0Pruner(student, target_sparsity=0.5, towers=("image",), tolerance=None)
    _force(pruner)
    pruned = pruner.prune().eval()
    assert pruned.cfg.text == student.cfg.text
    students.save_student(pruned, tmp_path)
    model = open_clip.create_model("local-dir:" + str(tmp_path)).eval()
    images, _ = tiny_batch(pruned)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images, normalize=True), pruned.encode_image(images))


def test_expected_sparsity_moves_with_log_alpha() -> None:
    student = students.create_student("tiny_vit_s")
    pruner = L0Pruner(student, target_sparsity=0.5)
    s0 = pruner.expected_sparsity().item()
    assert s0 == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        pruner.log_alpha["image_heads"][0, 0] = -10.0
    s1 = pruner.expected_sparsity().item()
    with torch.no_grad():
        pruner.log_alpha["text_hidden"][:10] = -10.0
    s2 = pruner.expected_sparsity().item()
    assert 0 < s1 < s2 < 1
    # one closed head of 3 x 3 layers in the image tower: 4*32*96 weights out of the pooled total
    image = 96 * 3 * (4 * 32 * 3 + 2 * 384)
    text = 64 * 2 * (4 * 32 * 2 + 2 * 256)
    assert s1 == pytest.approx(4 * 32 * 96 / (image + text), rel=1e-3)


def test_lagrangian_and_gradients() -> None:
    student = students.create_student("tiny_vit_s")
    pruner = L0Pruner(student, target_sparsity=0.5, warmup_steps=10, start_sparsity=0.1)
    assert pruner.target_at(0) == pytest.approx(0.1) and pruner.target_at(5) == pytest.approx(0.3)
    assert pruner.target_at(100) == pytest.approx(0.5)
    loss = pruner.sparsity_loss(10)
    gap = 0.5 - pruner.expected_sparsity().item()
    assert loss.item() == pytest.approx(10 * gap + 10 * gap**2, rel=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in pruner.parameters())
    assert pruner.lambdas["lambda_1"].grad.item() == pytest.approx(gap, rel=1e-4)
    # gates are pushed towards closing: gradient descent lowers log_alpha
    assert (pruner.log_alpha["image_heads"].grad >= 0).all()
    # once the target is met the constraint is inactive
    with torch.no_grad():
        for p in pruner.parameters():
            p.fill_(-10.0)
    assert pruner.lagrangian(0.5).item() == 0.0


def test_training_forward_samples_gates_and_backprops(tiny_batch) -> None:  # noqa: ANN001
    student = students.create_student("tiny_vit_s").train()
    pruner = L0Pruner(student, target_sparsity=0.5, init_log_alpha=0.0)
    images, tokens = tiny_batch(student)
    out = student(image=images, text=tokens)
    (out["image_features"].sum() + out["text_features"].sum()).backward()
    assert pruner.log_alpha["image_mlp"].grad is not None and pruner.log_alpha["text_hidden"].grad is not None
    state = pruner.state_dict()
    other = L0Pruner(students.create_student("tiny_vit_s"), target_sparsity=0.1)
    other.load_state_dict(state)
    assert other.target_sparsity == 0.5 and torch.equal(other.log_alpha["image_mlp"], pruner.log_alpha["image_mlp"])


def test_unsupported_towers_raise() -> None:
    with pytest.raises(ValueError, match="native open_clip ViT"):
        L0Pruner(students.create_student("test_tiny_mci"), 0.5)
    with pytest.raises(ValueError, match="TextTransformer"):
        L0Pruner(students.create_student("test_tiny_mct"), 0.5, towers=("text",))
    L0Pruner(students.create_student("test_tiny_mct"), 0.5, towers=("image",)).detach()


def test_deepcopy_of_attached_student_uses_its_own_weights(perturb, tiny_batch) -> None:  # noqa: ANN001
    import copy

    student = perturb(students.create_student("tiny_vit_s")).eval()
    pruner = L0Pruner(student, target_sparsity=0.5, tolerance=None)
    _force(pruner)
    images, tokens = tiny_batch(student)
    twin = copy.deepcopy(student)
    assert twin.visual.forward.__self__ is twin.visual
    assert all(
        torch.equal(a, b)
        for a, b in zip(_features(twin, images, tokens), _features(student, images, tokens), strict=True)
    )
    with torch.no_grad():
        twin.visual.proj.mul_(2.0)
        twin.text.text_projection.neg_()
    image, text = _features(twin, images, tokens)
    ref_image, ref_text = _features(student, images, tokens)
    torch.testing.assert_close(image, ref_image)  # L2-normalised: scaling the projection changes nothing
    torch.testing.assert_close(text, -ref_text)  # the copy's own (negated) projection is used
