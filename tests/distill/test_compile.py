"""`distill train --trainer.compile true` really compiles the student's towers (and keeps checkpoint keys).

`torch.compile(module)` only compiles `module.__call__`; `DistillModule` reaches the student through
`normalize` / `encode_image` / `encode_text`, so wrapping the whole student compiled nothing (0 graphs) and renamed
every checkpoint key to `student._orig_mod.*`. The compiler backend is switched to dynamo's `eager` here only to
keep the test fast on CPU (inductor's C++ code generation takes minutes on 2 cores); what is tested is that dynamo
captures the towers' graphs during training.
"""

import functools

import torch
from torch._dynamo.utils import counters

from distill.cli import main
from mcd_common.weights import read_state_dict_file


def test_compile_flag_compiles_both_towers_and_keeps_checkpoint_keys(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    argv = [
        "train",
        "--student",
        "test_tiny",
        "--data.path",
        str(tiny_corpus / "train"),
        "--data.batch_size",
        "8",
        "--data.num_workers",
        "0",
        "--trainer.max_steps",
        "2",
        "--trainer.compile",
        "true",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--val.zeroshot",
        "null",
        "--val.retrieval",
        "null",
    ]
    try:
        assert main(argv) == 0
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    # One graph per tower at least (image and text); 0 means the flag compiled nothing.
    assert graphs >= 2, f"--trainer.compile captured {graphs} graphs"
    keys = read_state_dict_file(tmp_path / "checkpoints" / "last.ckpt")
    assert not [k for k in keys if "_orig_mod" in k]
    assert any(k.startswith("student.visual.") for k in keys) and any(k.startswith("student.text.") for k in keys)
