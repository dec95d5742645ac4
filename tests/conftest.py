"""Module-scoped fixtures of the training test modules: two synthetic clips' shards at 32 px and a
tiny autoencoder file."""
from __future__ import annotations

import pytest
from train_helpers import tiny_config, write_autoencoder, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"), crop_size=32, seeds=(0, 1))


@pytest.fixture(scope="module")
def ae_file(tmp_path_factory):
    return write_autoencoder(tmp_path_factory.mktemp("ae") / "ae.safetensors", tiny_config())
