"""Schema helpers: syn keys, teacher slices, teach.json validation."""

from __future__ import annotations

import numpy as np
import pytest

from reinforced_data import schema


def test_syn_keys():
    assert schema.syn_emb_name("syn_text_blip") == "syn_text_blip_emb"


def test_teacher_slices_and_split():
    entries = [{"name": "a", "dim": 3}, {"name": "b", "dim": 2}]
    slices = schema.teacher_slices(entries)
    assert slices == {"a": slice(0, 3), "b": slice(3, 5)}
    assert schema.teacher_slices({"a": 3, "b": 2}) == slices
    assert schema.teacher_slices([3, 2]) == {"teacher0": slice(0, 3), "teacher1": slice(3, 5)}
    emb = np.arange(10.0).reshape(2, 5)
    parts = schema.split_embeddings(emb, slices)
    np.testing.assert_array_equal(parts["b"], emb[:, 3:])
    with pytest.raises(ValueError, match="sum of teacher dims"):
        schema.split_embeddings(np.zeros((2, 6)), slices)


def test_check_teach():
    good = {"schema_version": 1, "teachers": [{"name": "a", "dim": 4}]}
    assert schema.check_teach(good) == [{"name": "a", "dim": 4}]
    with pytest.raises(ValueError, match="newer"):
        schema.check_teach({**good, "schema_version": schema.SCHEMA_VERSION + 1})
    with pytest.raises(ValueError, match="non-empty"):
        schema.check_teach({"teachers": []})
    with pytest.raises(ValueError, match="duplicate"):
        schema.check_teach({"teachers": [{"name": "a", "dim": 4}, {"name": "a", "dim": 4}]})
    with pytest.raises(ValueError, match="positive"):
        schema.check_teach({"teachers": [{"name": "a", "dim": 0}]})
