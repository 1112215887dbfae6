import json

import numpy as np
import pytest

from ernie_vilg.data.token_shards import TokenShardError, TokenShards, TokenShardWriter


def make(tmp_path, n=7, grid=4, k=300, shard_size=3):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, k, size=(n, grid, grid))
    w = TokenShardWriter(tmp_path, grid, k, shard_size=shard_size, info={"image_size": 16})
    for i in range(n):
        w.add(ids[i], f"文本{i}", [f"文本{i}", f"另一个{i}"], {"image": f"{i}.png", "attrs": {"n": i}})
    info = w.close()
    return ids, info


def test_round_trip_across_shards(tmp_path):
    ids, info = make(tmp_path)
    assert info["count"] == 7 and len(info["shards"]) == 3
    shards = TokenShards(tmp_path)
    assert len(shards) == 7 and shards.grid == 4 and shards.info["image_size"] == 16
    for i in range(7):
        rec = shards[i]
        assert np.array_equal(rec.image_ids, ids[i]) and rec.image_ids.dtype == np.int64
        assert rec.text == f"文本{i}" and rec.texts[1] == f"另一个{i}"
        assert rec.meta["attrs"] == {"n": i} and rec.meta["image"] == f"{i}.png"
    with pytest.raises(IndexError):
        shards[7]


def test_ids_are_memory_mapped_and_compact(tmp_path):
    make(tmp_path)
    shards = TokenShards(tmp_path)
    assert isinstance(shards._ids[0], np.memmap) and shards._ids[0].dtype == np.uint16


def test_wrong_dtype_or_shape_is_refused(tmp_path):
    make(tmp_path)
    np.save(tmp_path / "shard-00001.npy", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(TokenShardError, match="shard-00001.npy: dtype float32"):
        TokenShards(tmp_path)
    np.save(tmp_path / "shard-00001.npy", np.zeros((3, 5, 4), np.uint16))
    with pytest.raises(TokenShardError, match="shard-00001.npy: shape"):
        TokenShards(tmp_path)


def test_writer_rejects_out_of_range_ids(tmp_path):
    w = TokenShardWriter(tmp_path, 2, 10)
    with pytest.raises(TokenShardError, match="outside"):
        w.add(np.full((2, 2), 10), "t", ["t"], {})


def test_folder_without_info_is_not_complete(tmp_path):
    w = TokenShardWriter(tmp_path, 2, 10, shard_size=1)
    w.add(np.zeros((2, 2), int), "t", ["t"], {})  # flushed, but close() never ran
    with pytest.raises(TokenShardError, match="info.json: not found"):
        TokenShards(tmp_path)
