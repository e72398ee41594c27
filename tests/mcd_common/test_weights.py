"""The one weight reader never unpickles, and names the file in one line when it cannot read it."""

import os

import pytest
import torch
from safetensors.torch import save_file

from mcd_common import UsageError
from mcd_common.weights import WeightSpec, load_torch_bytes, read_state_dict_file, read_weights, state_dict_mismatch


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious(path, marker):
    torch.save({"weight": _Payload(str(marker))}, path)


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_malicious_pickle_is_refused_even_with_the_force_variable(tmp_path, monkeypatch, force_unsafe):
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    _malicious(evil, marker)
    with pytest.raises(UsageError, match="refusing to load"):
        read_weights(evil)
    with pytest.raises(UsageError, match="refusing to load"):
        load_torch_bytes(evil.read_bytes())
    assert not marker.exists()


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_pickle_that_trips_the_weights_only_unpickler_is_refused(
    tmp_path, monkeypatch, malicious_checkpoint, force_unsafe
):
    # the file open_clip's load_state_dict retries without weights_only (TypeError), i.e. runs with the variable set
    if force_unsafe:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker, style="typeerror")
    with pytest.raises(UsageError, match="refusing to load") as info:
        read_weights(evil, what="--teacher_weights")
    assert not marker.exists() and str(evil) in str(info.value) and "\n" not in str(info.value)


def test_state_dict_mismatch_is_one_line():
    expected = {"a": torch.zeros(2), "b": torch.zeros(3, 3)}
    assert state_dict_mismatch(expected, {"a": torch.ones(2), "b": torch.ones(3, 3)}) == ""
    msg = state_dict_mismatch(expected, {"b": torch.ones(3, 2), "c": torch.ones(1)})
    assert msg == "missing: a; unexpected: c; shape mismatch: b: file (3, 2) vs model (3, 3)"
    many = state_dict_mismatch({f"k{i}": torch.zeros(1) for i in range(20)}, {}, limit=3)
    assert many == "missing: k0, k1, k10, ... (20 in all)"


def test_torch_and_safetensors_are_detected_from_content(tmp_path):
    torch.save({"state_dict": {"a": torch.ones(2)}}, tmp_path / "x.ckpt")
    save_file({"b": torch.zeros(3)}, str(tmp_path / "y.bin"))
    assert torch.equal(read_state_dict_file(tmp_path / "x.ckpt")["a"], torch.ones(2))
    assert torch.equal(read_state_dict_file(tmp_path / "y.bin")["b"], torch.zeros(3))


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"not weights at all", "neither a torch checkpoint nor a safetensors"), (None, "no such file")],
)
def test_bad_files_give_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as info:
        read_weights(path, what="--teacher_weights")
    assert "\n" not in str(info.value) and str(path) in str(info.value) and "--teacher_weights" in str(info.value)


def test_truncated_checkpoint_is_a_usage_error(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"a": torch.ones(1000)}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UsageError, match="not a readable torch checkpoint"):
        read_weights(bad)


def test_non_tensor_entries_are_refused(tmp_path):
    torch.save({"a": torch.ones(1), "epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(UsageError, match="non-tensor"):
        read_state_dict_file(tmp_path / "x.pt")


def test_weight_spec_validates_and_stores_strings(tmp_path):
    assert WeightSpec(file=tmp_path).file == os.fspath(tmp_path)
    assert WeightSpec().is_empty and not WeightSpec(url="http://x").is_empty
    with pytest.raises(UsageError, match="org/repo"):
        WeightSpec(hf_hub="justone")
