"""Fixtures for distill tests: a tiny embedded corpus written once per session."""

import pytest

from reinforced_data.shapes import CorpusCfg, write_shapes_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_shapes_corpus(root, CorpusCfg(n_train=96, n_val=16, n_zeroshot_per_class=1, shard_size=48, image_size=32))
    return root
