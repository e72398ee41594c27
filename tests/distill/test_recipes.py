"""`distill.recipes`: `--config NAME` resolves to the packaged YAML from any directory; typos list close matches;
paths keep their meaning."""

import json
from pathlib import Path

import pytest
import yaml

from distill.cli import main
from distill.recipes import list_recipes, recipe_path, recipe_rows, resolve_config_args
from mcd_common import UnknownNameError

CONFIGS = Path(__file__).resolve().parents[2] / "distill" / "configs"


def test_every_shipped_yaml_is_a_recipe():
    assert list_recipes() == sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert recipe_path("mobileclip_s0_reinforced").samefile(CONFIGS / "mobileclip_s0_reinforced.yaml")
    assert recipe_path("mobileclip_s0_reinforced.yaml") == recipe_path("mobileclip_s0_reinforced")
    rows = {r["name"]: r for r in recipe_rows()}
    assert rows["mobileclip_s0_reinforced"]["student"] == "mobileclip_s0"
    assert rows["tinyclip_vit40m_online"]["mode"] == "online"


def test_recipe_name_resolves_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["train", "--config", "mobileclip_s0_reinforced", "--print_config"])
    assert err.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == yaml.safe_load((CONFIGS / "mobileclip_s0_reinforced.yaml").read_text())
    args = resolve_config_args(["train", "--config=shapes_scratch_cpu", "--trainer.max_steps", "2"])
    assert Path(args[1].split("=", 1)[1]).samefile(CONFIGS / "shapes_scratch_cpu.yaml") and args[2:] == [
        "--trainer.max_steps",
        "2",
    ]


def test_a_typo_is_a_usage_error_with_close_matches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownNameError, match="did you mean mobileclip_s0_reinforced"):
        recipe_path("mobileclip_s0_reinforcd")
    assert main(["train", "--config", "mobileclip_s0_reinforcd"]) == 2
    err = capsys.readouterr().err
    assert "--config mobileclip_s0_reinforcd" in err and "mobileclip_s0_reinforced" in err and "Traceback" not in err


def test_existing_files_and_paths_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mobileclip_s0_reinforced.yaml").write_text("student: test_tiny\n")
    for argv in (
        ["train", "--config", "mobileclip_s0_reinforced.yaml"],  # a file in the cwd wins over the recipe
        ["train", "--config", "sub/dir/x.yaml"],  # a path: jsonargparse reports it if missing
        ["train", "--config", "~/x.yaml"],
        ["train", "--config", "{student: test_tiny}"],  # inline YAML, which jsonargparse accepts too
    ):
        assert resolve_config_args(argv) == argv


def test_the_pretrained_text_teacher_recipe_trains_with_its_text_encoder_locked(
    tmp_path, monkeypatch, tiny_corpus, tiny_hf_text_dir
):
    # The shipped MiniLM teacher recipe (issue 15), with any local encoder directory (here a tiny BERT): the text
    # encoder stays exactly as loaded, the image tower trains, and the run serves as a `local-dir:` teacher.
    import torch
    from safetensors.torch import load_file
    from transformers import BertModel

    import teachers

    monkeypatch.chdir(tmp_path)
    rows = {r["name"]: r for r in recipe_rows()}
    assert rows["minilm_teacher_lit"]["student"] == "vit_minilm"
    root = tmp_path / "teacher"
    argv = [
        "train", "--config", "minilm_teacher_lit", "--hf_text_dir", str(tiny_hf_text_dir),
        "--data.path", str(tiny_corpus / "train"), "--data.batch_size", "8", "--data.num_workers", "0",
        "--image_size", "32", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root),
        "--trainer.checkpoint_every_n_steps", "2", "--trainer.enable_progress_bar", "false",
        "--val.zeroshot", "null", "--val.retrieval", "null",
    ]  # fmt: skip
    assert main(argv) == 0
    run = json.loads((root / "run.json").read_text())
    assert run["config"]["lock"]["text"] is True and run["config"]["student"] == "vit_minilm"
    state = load_file(str(next((root / "student").glob("*.safetensors"))))
    encoder = BertModel.from_pretrained(tiny_hf_text_dir, local_files_only=True, add_pooling_layer=False)
    for key, value in encoder.state_dict().items():
        assert torch.equal(state[f"text.transformer.{key}"], value), key
    teacher = teachers.create_teacher(f"local-dir:{root / 'student'}")
    with torch.no_grad():
        emb = teacher.encode_texts(["a red circle", "a blue square"])
    assert emb.shape[0] == 2 and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-4)
