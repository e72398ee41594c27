"""One flag name per concept across commands (issue 13): `--data.*` is the input data of build-data and train,
`--val.*` the evaluation sets of eval and train, and each set's captions and split files are `captions` and
`split_file`. The old spellings still work for one release: flags, `--config` keys and Python keywords, each with
a deprecation message."""

import csv
import dataclasses
import importlib
import inspect
import json
import logging

import pytest
import torch
import yaml

from distill.args import EvalArgs
from distill.cli import SUBCOMMANDS, main
from distill.evaluate import evaluate
from distill.recipes import recipe_path
from reinforced_data.build import BuildArgs, InputArgs, build_data
from reinforced_data.shapes import render_scene
from students import create_student, save_student

_BUILD = ["--teacher", "test_tiny", "--build.num_augs", "1", "--build.num_syn", "0", "--build.num_workers", "0"]
_BUILD += ["--build.progress", "false", "--build.batch_size", "8"]


@pytest.fixture(scope="module")
def flickr_like(tmp_path_factory):
    """Flickr8k's layout: `images/`, `captions.csv` (two rows per image) and `splits/{train,test}.txt`."""
    root = tmp_path_factory.mktemp("flickr_like")
    (root / "images").mkdir()
    (root / "splits").mkdir()
    rows = []
    for i in range(12):
        image, captions, _ = render_scene(0, "walkthrough", i, image_size=32)
        image.save(root / "images" / f"{i:03d}.jpg")
        rows += [(f"{i:03d}.jpg", c) for c in captions[:2]]
    with open(root / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    (root / "splits" / "train.txt").write_text("".join(f"{i:03d}.jpg\n" for i in range(8)))
    (root / "splits" / "test.txt").write_text("".join(f"{i:03d}.jpg\n" for i in range(8, 12)))
    return root


def _deprecations(caplog):
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


def test_every_new_name_is_a_flag_of_its_command():
    for command, (module, func) in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        params = inspect.signature(getattr(mod, func)).parameters
        for old, new in getattr(mod, "DEPRECATED_FLAGS", {}).items():
            group, _, field = new.removeprefix("--").partition(".")
            assert group in params, (command, old, new)
            if field:
                assert field in {f.name for f in dataclasses.fields(params[group].default)}, (command, old, new)


def test_eval_old_data_flags_give_the_same_results(tmp_path, flickr_like, caplog):
    torch.manual_seed(0)
    save_student(create_student("test_tiny").eval(), tmp_path / "student")
    common = ["eval", "--student", str(tmp_path / "student"), "--device", "cpu"]
    split = str(flickr_like / "splits" / "test.txt")
    new = ["--val.retrieval", str(flickr_like), "--val.split_file", split, "--out", str(tmp_path / "new.json")]
    old = ["--data.retrieval", str(flickr_like), f"--data.retrieval_split_file={split}"]
    with caplog.at_level(logging.WARNING):
        assert main([*common, *new]) == 0
        assert not _deprecations(caplog)
        assert main([*common, *old, "--out", str(tmp_path / "old.json")]) == 0
    assert _deprecations(caplog) == [
        "distill eval: --data.retrieval is deprecated and will be removed in the next release; use --val.retrieval",
        "distill eval: --data.retrieval_split_file is deprecated and will be removed in the next release; use "
        "--val.split_file",
    ]
    got_new, got_old = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("new", "old"))
    assert got_new["retrieval_images"] == 4 and got_new["retrieval_split"] == split
    assert got_old == got_new
    # the Python keyword too, with a FutureWarning
    with pytest.warns(FutureWarning, match=r"evaluate\(data=...\) is deprecated.*use val="):
        res = evaluate(student=str(tmp_path / "student"), data=EvalArgs(retrieval=str(flickr_like), split_file=split))
    assert res["t2i_R@1"] == got_new["t2i_R@1"]


def test_build_data_old_input_flags_build_the_same_dataset_which_new_flags_resume(tmp_path, flickr_like, caplog):
    split = str(flickr_like / "splits" / "train.txt")
    out = tmp_path / "dr"
    with caplog.at_level(logging.WARNING):
        old = main(["build-data", "--out", str(out), "--input", str(flickr_like), "--split_file", split, *_BUILD])
    assert old == 0
    assert [m.split(";")[0] for m in _deprecations(caplog)] == [
        "distill build-data: --input is deprecated and will be removed in the next release",
        "distill build-data: --split_file is deprecated and will be removed in the next release",
    ]
    first = json.loads((out / "config.json").read_text())
    # the same dataset under the new names: its identity is unchanged, so the rerun resumes instead of refusing
    summary = build_data(
        out=out,
        data=InputArgs(path=str(flickr_like), split_file=split),
        teacher="test_tiny",
        build=BuildArgs(num_augs=1, num_syn=0, num_workers=0, progress=False, batch_size=8),
    )
    assert summary["ok"] and summary["written"] == 0
    assert json.loads((out / "config.json").read_text()) == first
    with pytest.warns(FutureWarning, match=r"build_data\(input=...\) is deprecated.*use data="):
        again = build_data(
            out=out,
            input=str(flickr_like),
            split_file=split,
            teacher="test_tiny",
            build=BuildArgs(num_augs=1, num_syn=0, num_workers=0, progress=False, batch_size=8),
        )
    assert again["ok"] and again["written"] == 0
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sum(m["num_samples"] for m in manifest) == 8  # the train split only


def _print_config(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_config_files_with_the_old_keys_still_parse(tmp_path, capsys, caplog):
    # a --print_config dump written before the rename (the shipped recipe with the old val keys)
    old_train = yaml.safe_load(recipe_path("shapes_scratch_cpu").read_text())
    val = old_train["val"]
    val["retrieval_captions"], val["retrieval_split_file"] = val.pop("captions"), "splits/test.txt"
    del val["split_file"]
    (tmp_path / "old_train.yaml").write_text(yaml.safe_dump(old_train))
    with caplog.at_level(logging.WARNING):
        printed = _print_config(["train", "--config", str(tmp_path / "old_train.yaml")], capsys)
    assert printed["val"]["split_file"] == "splits/test.txt" and "retrieval_split_file" not in printed["val"]
    (message,) = _deprecations(caplog)
    assert "old_train.yaml uses deprecated keys (val.retrieval_captions -> val.captions" in message
    assert "--print_config" in message
    # eval's sets were the `data` group; build-data's inputs were top-level keys and build.corpus_dir
    (tmp_path / "old_eval.yaml").write_text(
        yaml.safe_dump({"student": "test_tiny", "data": {"zeroshot": "z", "retrieval_split_file": "s"}})
    )
    printed = _print_config(["eval", "--config", str(tmp_path / "old_eval.yaml")], capsys)
    assert "data" not in printed
    assert printed["val"]["zeroshot"] == "z" and printed["val"]["split_file"] == "s"
    old_build = {"input": "p", "captions": "c.csv", "split_file": "t.txt", "build": {"corpus_dir": "corpus"}}
    printed = _print_config(["build-data", f"--config={yaml.safe_dump(old_build)}"], capsys)  # inline YAML too
    assert printed["data"] == {"path": "p", "captions": "c.csv", "split_file": "t.txt", "corpus_dir": "corpus"}
    assert "corpus_dir" not in printed["build"] and "input" not in printed
