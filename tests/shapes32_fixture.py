"""Shared fixture of the tokenizer and Table 7 tests: a tiny shapes world (32 px)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from ernie_vilg.data.shapes import write_shapes_dataset

    out = tmp_path_factory.mktemp("shapes32")
    write_shapes_dataset(out, num_train=16, num_val=4, num_test=4, size=32, seed=0)
    return out
