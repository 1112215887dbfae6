"""The sharded safetensors checkpoint layout (`checkpoint_io`): streamed writes, lazy reads, the
index, the name partition over ranks, nested optimizer states, and the older layout still loading."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from ernie_vilg.checkpoint_io import (
    OPTIMIZER_PREFIX,
    WEIGHTS_PREFIX,
    CheckpointError,
    flatten_state,
    index_name,
    list_checkpoints,
    load_model_state,
    load_optimizer_state,
    partition_names,
    read_sharded,
    save_checkpoint,
    shard_name,
    unflatten_state,
    write_index,
    write_partition,
    write_shard,
)
from ernie_vilg.config import Config
from ernie_vilg.safetensors_file import SafetensorsError, SafetensorsReader, load_safetensors, write_safetensors_streaming


def every_dtype() -> dict[str, paddle.Tensor]:
    paddle.seed(0)
    return {"w": paddle.randn([3, 5]), "bf": paddle.randn([4]).astype("bfloat16"),
            "half": paddle.randn([2, 2]).astype("float16"), "ids": paddle.arange(7), "scalar": paddle.to_tensor(3.5),
            "mask": paddle.to_tensor([True, False]), "empty": paddle.zeros([0, 3]), "i32": paddle.to_tensor([1, 2], "int32")}


def same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and list(a[k].shape) == list(b[k].shape) and np.array_equal(a[k].numpy(), b[k].numpy())
        for k in a)


def test_streamed_file_is_a_safetensors_file_read_back_bit_for_bit(tmp_path) -> None:
    state = every_dtype()
    write_safetensors_streaming(state, tmp_path / "x.safetensors", {"note": "hi"})
    by_library, meta = load_safetensors(tmp_path / "x.safetensors")  # the safetensors package's reader
    assert same(by_library, state) and meta == {"note": "hi"}
    with SafetensorsReader(tmp_path / "x.safetensors") as reader:
        assert same({k: reader.get(k) for k in reader.keys()}, state)


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: (10 ** 12).to_bytes(8, "little") + b[8:], "header length"),
    (lambda b: b[:-3], "offsets"),
    (lambda b: b[:8] + b"{not json" + b[17:], "header"),
])
def test_a_corrupt_or_hostile_file_is_refused_naming_it(tmp_path, corrupt, message) -> None:
    path = tmp_path / "x.safetensors"
    write_safetensors_streaming({"w": paddle.ones([16])}, path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(SafetensorsError, match=rf"x\.safetensors: .*{message}"):
        SafetensorsReader(path)


def test_overlapping_tensors_are_refused(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + bytes(12))
    with pytest.raises(SafetensorsError, match="overlap"):
        SafetensorsReader(path)


def test_partition_covers_every_name_once_balanced_and_the_same_everywhere() -> None:
    state = {f"t{i}": np.zeros(size, dtype=np.float32) for i, size in enumerate([100, 90, 10, 10, 5, 80, 1])}
    parts = partition_names(state, 3)
    assert sorted(n for p in parts for n in p) == sorted(state)
    loads = [sum(state[n].nbytes for n in p) for p in parts]
    assert max(loads) - min(loads) <= 100 * 4  # greedy: off by at most the largest tensor
    assert partition_names(dict(reversed(list(state.items()))), 3) == parts  # order-independent


def test_ranks_write_their_parts_and_the_index_reassembles_the_state(tmp_path) -> None:
    model = every_dtype()
    optimizer = {"w_moment1_0": paddle.ones([3, 5]), "master_weights": {"w": paddle.full([3, 5], 2.0)},
                 "LR_Scheduler": {"last_lr": 0.001, "last_epoch": 7}}
    for rank in range(2):  # what each process of a 2-process dp run writes
        write_partition(tmp_path, WEIGHTS_PREFIX, model, rank, 2)
        write_partition(tmp_path, OPTIMIZER_PREFIX, optimizer, rank, 2)
    assert sorted(p.name for p in tmp_path.glob("model-*")) == [shard_name("model", 0, 2), shard_name("model", 1, 2)]
    write_index(tmp_path, WEIGHTS_PREFIX)
    write_index(tmp_path, OPTIMIZER_PREFIX)
    index = json.loads((tmp_path / index_name("model")).read_text())
    assert set(index["weight_map"]) == set(model) and len(set(index["weight_map"].values())) == 2
    assert same(read_sharded(tmp_path, WEIGHTS_PREFIX), model)
    back = read_sharded(tmp_path, OPTIMIZER_PREFIX)
    assert back["LR_Scheduler"] == optimizer["LR_Scheduler"]
    assert np.array_equal(back["master_weights"]["w"].numpy(), optimizer["master_weights"]["w"].numpy())
    # only what the caller keeps is read
    assert list(read_sharded(tmp_path, WEIGHTS_PREFIX, keep=lambda n: n == "w")) == ["w"]


def test_an_index_over_missing_shards_is_refused(tmp_path) -> None:
    write_shard(tmp_path, WEIGHTS_PREFIX, {"a": paddle.ones([2])}, 0, 2)
    with pytest.raises(CheckpointError, match="incomplete model shards"):
        write_index(tmp_path, WEIGHTS_PREFIX)


def test_flatten_and_unflatten_are_inverse() -> None:
    state = {"a": paddle.ones([1]), "n": {"b": paddle.zeros([2]), "c": {"d": paddle.ones([3])}, "lr": 0.1}, "s": "x"}
    tensors, other = flatten_state(state)
    assert sorted(tensors) == ["a", "n/b", "n/c/d"] and other == {"n": {"lr": 0.1}, "s": "x"}
    back = unflatten_state(tensors, other)
    assert back["n"]["lr"] == 0.1 and back["s"] == "x" and back["n"]["c"]["d"] is tensors["n/c/d"]


def test_checkpoints_of_both_layouts_are_found_and_load(tmp_path) -> None:
    cfg = Config()
    state = {"w": paddle.randn([4, 4])}
    new = save_checkpoint(tmp_path / "ckpts", 2, cfg, state, optimizer_state={"w_moment1_0": paddle.ones([4, 4])})
    assert (new / index_name("model")).is_file() and not (new / "model.pdparams").exists()
    assert same(load_model_state(new), state)
    assert np.array_equal(load_optimizer_state(new)["w_moment1_0"].numpy(), np.ones([4, 4], np.float32))
    # a checkpoint of the older layout: model.pdparams + optimizer.pdopt
    old = tmp_path / "ckpts" / "step-00000001"
    old.mkdir()
    paddle.save(state, str(old / "model.pdparams"))
    paddle.save({"w_moment1_0": paddle.zeros([4, 4])}, str(old / "optimizer.pdopt"))
    for name in ("config.yaml", "meta.json"):
        (old / name).write_bytes((new / name).read_bytes())
    assert [p.name for p in list_checkpoints(tmp_path / "ckpts")] == ["step-00000001", "step-00000002"]
    assert same(load_model_state(old), state)
    assert float(load_optimizer_state(old)["w_moment1_0"].sum()) == 0.0
    # a folder without weights in either layout is not a checkpoint
    (tmp_path / "ckpts" / "step-00000003").mkdir()
    for name in ("config.yaml", "meta.json"):
        (tmp_path / "ckpts" / "step-00000003" / name).write_bytes((new / name).read_bytes())
    assert len(list_checkpoints(tmp_path / "ckpts")) == 2


def test_merge_writes_one_shard_and_keeps_the_optimizer(tmp_path) -> None:
    from ernie_vilg.training.merge import merge_checkpoint

    cfg = Config()
    state = {"w": paddle.randn([4, 4]), "b": paddle.randn([4])}
    src = tmp_path / "src"
    src.mkdir()
    for rank in range(2):
        write_partition(src, WEIGHTS_PREFIX, state, rank, 2)
        write_partition(src, OPTIMIZER_PREFIX, {"w_moment1_0": paddle.ones([4, 4]), "b_moment1_0": paddle.ones([4])},
                        rank, 2)
    ckpt = save_checkpoint(tmp_path / "run", 5, cfg, state)  # for config.yaml / meta.json
    for f in src.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    for p in ckpt.glob("model-00001-of-00001*"):
        p.unlink()
    write_index(ckpt, WEIGHTS_PREFIX)
    write_index(ckpt, OPTIMIZER_PREFIX)
    out = merge_checkpoint(ckpt, tmp_path / "merged", with_optimizer=True)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [shard_name("model", 0, 1), shard_name("optimizer", 0, 1)]
    assert same(load_model_state(out), state)
    assert sorted(load_optimizer_state(out)) == ["b_moment1_0", "w_moment1_0"]


def test_weights_stream_into_the_model_with_the_strict_checks(tmp_path) -> None:
    from ernie_vilg.checkpoint_io import load_weights_into, save_weights

    paddle.seed(1)
    source = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.LayerNorm(3))
    save_weights(tmp_path, {k: v.astype("float16") if k.endswith("weight") else v
                            for k, v in source.state_dict().items()})  # half weights: cast on load
    paddle.seed(2)
    target = paddle.nn.Sequential(paddle.nn.Linear(4, 3), paddle.nn.LayerNorm(3))
    load_weights_into(target, tmp_path)
    for key, value in source.state_dict().items():
        got = target.state_dict()[key]
        assert got.dtype == paddle.float32
        np.testing.assert_allclose(got.numpy(), value.numpy(), atol=1e-3 if key.endswith("weight") else 0)
    # another shape: refused naming the key, before any weight is copied
    other = paddle.nn.Sequential(paddle.nn.Linear(4, 5), paddle.nn.LayerNorm(5))
    before = {k: v.numpy().copy() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"0\.weight has shape \[4, 3\] in the checkpoint"):
        load_weights_into(other, tmp_path)
    assert all(np.array_equal(before[k], v.numpy()) for k, v in other.state_dict().items())
