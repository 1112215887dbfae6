"""Streaming token loader: exact resume mid-epoch, disjoint rank split, bad records counted."""
import json
from collections import Counter

import numpy as np
import pytest

from ernie_vilg.data.streaming import StreamingTokenLoader
from ernie_vilg.data.token_shards import TokenShardError, TokenShardWriter

GRID, K = 2, 50


def make_folder(path, n=53, shard_size=10, prefix="shard"):
    """Row i has ids filled with i % K and text 't{i}', so every sample names its row."""
    w = TokenShardWriter(path, GRID, K, shard_size=shard_size, prefix=prefix)
    for i in range(n):
        w.add(np.full((GRID, GRID), i % K), f"t{i}", [f"t{i}"], {"row": i})
    return w.close()


def take(loader, n_batches):
    it = iter(loader)
    return [next(it) for _ in range(n_batches)]


def indices(batches):
    return [int(i) for b in batches for i in b["index"]]


def test_batches_carry_ids_text_and_meta(tmp_path):
    make_folder(tmp_path, n=12, shard_size=5)
    (b,) = take(StreamingTokenLoader(tmp_path, 4, seed=1, buffer_size=3), 1)
    assert b["image_ids"].shape == (4, GRID, GRID) and b["image_ids"].dtype == np.int64
    for idx, ids, text, meta in zip(b["index"], b["image_ids"], b["text"], b["meta"]):
        assert text == f"t{idx}" and meta["row"] == idx and (ids == idx % K).all()


@pytest.mark.parametrize("shuffle,buffer_size", [(True, 7), (True, 1000), (False, 7)])
def test_exact_resume_mid_epoch(tmp_path, shuffle, buffer_size):
    make_folder(tmp_path)
    kw = dict(batch_size=4, seed=3, buffer_size=buffer_size, shuffle=shuffle)
    full = indices(take(StreamingTokenLoader(tmp_path, **kw), 40))  # > 3 epochs of 53 rows
    for cut in (1, 5, 13, 14, 27):  # mid-shard, mid-epoch, across epoch boundaries
        a = StreamingTokenLoader(tmp_path, **kw)
        it = iter(a)
        head = [next(it) for _ in range(cut)]
        state = json.loads(json.dumps(a.state_dict()))  # survives serialisation
        b = StreamingTokenLoader(tmp_path, **kw)
        b.set_state_dict(state)
        tail = take(b, 40 - cut)
        assert indices(head) + indices(tail) == full, cut


def test_resume_state_survives_paddle_save(tmp_path):
    import paddle

    make_folder(tmp_path)
    a = StreamingTokenLoader(tmp_path, 4, seed=0, buffer_size=9)
    it = iter(a)
    for _ in range(6):
        next(it)
    paddle.save({"data": a.state_dict()}, str(tmp_path / "s.pd"))
    expected = indices([next(it) for _ in range(5)])
    b = StreamingTokenLoader(tmp_path, 4, seed=0, buffer_size=9)
    b.set_state_dict(paddle.load(str(tmp_path / "s.pd"))["data"])
    assert indices(take(b, 5)) == expected


def test_each_epoch_is_a_permutation_and_seeds_differ(tmp_path):
    make_folder(tmp_path)
    seq = [s["index"] for _, s in zip(range(53 * 3), StreamingTokenLoader(tmp_path, 1, seed=0, buffer_size=8).samples())]
    for e in range(3):
        assert sorted(seq[53 * e: 53 * (e + 1)]) == list(range(53))
    assert seq[:53] != seq[53:106]  # a fresh order every epoch
    other = [s["index"] for _, s in zip(range(53), StreamingTokenLoader(tmp_path, 1, seed=1, buffer_size=8).samples())]
    assert other != seq[:53]
    plain = [s["index"] for _, s in zip(range(53), StreamingTokenLoader(tmp_path, 1, shuffle=False).samples())]
    assert plain == list(range(53))


@pytest.mark.parametrize("n,shard_size,world", [(53, 10, 2), (53, 10, 4), (53, 10, 6), (20, 10, 3), (7, 10, 4)])
def test_ranks_are_disjoint_and_cover_every_row_once_per_epoch(tmp_path, n, shard_size, world):
    make_folder(tmp_path, n=n, shard_size=shard_size)
    seen = []
    for rank in range(world):
        loader = StreamingTokenLoader(tmp_path, 1, seed=5, rank=rank, world_size=world, buffer_size=4)
        per_epoch = loader.rows_per_epoch()
        rows = [s["index"] for _, s in zip(range(per_epoch), loader.samples())]
        assert len(set(rows)) == per_epoch
        if loader.mode == "shards":  # whole files per rank
            assert {r // shard_size for r in rows} == {k for k in range(-(-n // shard_size)) if k % world == rank}
        seen.extend(rows)
    assert sorted(seen) == list(range(n))  # disjoint (no repeats) and complete


def test_bad_records_are_skipped_and_counted(tmp_path):
    make_folder(tmp_path, n=30, shard_size=10)
    meta = tmp_path / "shard-00001.jsonl"
    lines = meta.read_text(encoding="utf-8").splitlines()
    lines[2] = "{not json"  # row 12
    lines[3] = json.dumps({"texts": ["no text field"]})  # row 13
    lines = lines[:9]  # row 19 has no meta line
    meta.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ids = np.load(tmp_path / "shard-00002.npy")
    ids[4, 0, 0] = K + 3  # row 24: id out of range
    np.save(tmp_path / "shard-00002.npy", ids)
    loader = StreamingTokenLoader(tmp_path, 1, seed=0, buffer_size=5)
    rows = [s["index"] for _, s in zip(range(26 * 2), loader.samples())]
    bad = {12, 13, 19, 24}
    assert sorted(rows[:26]) == [i for i in range(30) if i not in bad]
    assert sorted(rows[26:]) == sorted(rows[:26])
    assert loader.stats["bad_meta"] == 4 and loader.stats["missing_meta"] == 2 and loader.stats["bad_ids"] == 2


def test_unreadable_shard_is_skipped_and_counted(tmp_path):
    make_folder(tmp_path, n=30, shard_size=10)
    (tmp_path / "shard-00000.npy").write_bytes(b"garbage")
    loader = StreamingTokenLoader(tmp_path, 4, seed=0, buffer_size=5)
    rows = indices(take(loader, 5))
    assert sorted(rows) == list(range(10, 30))
    assert loader.stats["bad_shards"] == 1 and loader.stats["bad_shard_rows"] == 10


def test_all_bad_raises_instead_of_spinning(tmp_path):
    make_folder(tmp_path, n=5, shard_size=10)
    (tmp_path / "shard-00000.jsonl").write_text("x\n" * 5, encoding="utf-8")
    with pytest.raises(TokenShardError, match="no readable row"):
        take(StreamingTokenLoader(tmp_path, 2), 1)


def test_changed_world_size_restarts_the_saved_epoch(tmp_path):
    make_folder(tmp_path)
    a = StreamingTokenLoader(tmp_path, 4, seed=0, buffer_size=5, world_size=2)
    take(a, 20)
    state = a.state_dict()
    b = StreamingTokenLoader(tmp_path, 4, seed=0, buffer_size=5, world_size=1)
    b.set_state_dict(state)
    assert b.epoch == state["epoch"] and b.shard_cursor == 0 and not b._buffer_keys


def test_encode_texts_hook(tmp_path):
    make_folder(tmp_path, n=8, shard_size=4)
    loader = StreamingTokenLoader(tmp_path, 3, encode_texts=lambda ts: np.array([[len(t)] for t in ts]))
    (b,) = take(loader, 1)
    assert b["text_ids"].tolist() == [[len(t)] for t in b["text"]]


def test_works_on_merged_prefixed_shards(tmp_path):
    from ernie_vilg.vq.parallel_tokenize import merge_shard_infos

    parts = []
    for w, (lo, hi) in enumerate([(0, 7), (7, 15)]):
        part = tmp_path / f"_part{w}"
        wr = TokenShardWriter(part, GRID, K, shard_size=4, prefix=f"w{w:03d}-shard")
        for i in range(lo, hi):
            wr.add(np.full((GRID, GRID), i), f"t{i}", [f"t{i}"], {})
        parts.append(part)
        wr.close()
    info = merge_shard_infos(parts, tmp_path, extra={"note": "merged"})
    assert info["count"] == 15 and [s["ids"] for s in info["shards"]][:2] == ["w000-shard-00000.npy", "w000-shard-00001.npy"]
    loader = StreamingTokenLoader(tmp_path, 1, shuffle=False)
    got = [(s["index"], s["text"]) for _, s in zip(range(15), loader.samples())]
    assert got == [(i, f"t{i}") for i in range(15)]
    assert Counter(p.name for p in tmp_path.iterdir() if p.is_dir()) == Counter()  # parts removed


# ------------------------------------------------------------------ parallel tokenization

def test_split_manifest_cuts_at_line_starts(tmp_path):
    from ernie_vilg.vq.parallel_tokenize import split_manifest

    m = tmp_path / "m.jsonl"
    lines = [json.dumps({"image": f"{i}.png", "text": "猫" * (i % 7 + 1)}, ensure_ascii=False) for i in range(50)]
    m.write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = m.read_bytes()
    for parts in (1, 2, 3, 7, 60):
        slices = split_manifest(m, parts)
        assert len(slices) == parts and slices[0][0] == 0 and slices[-1][1] == len(data)
        got = []
        for (lo, hi, first), nxt in zip(slices, slices[1:] + [None]):
            assert lo == 0 or data[lo - 1:lo] == b"\n"
            chunk = data[lo:hi].decode("utf-8").splitlines()
            assert first == 1 + data[:lo].count(b"\n")
            got.extend(chunk)
        assert got == lines


def test_parallel_tokenize_equals_single_process(tmp_path):
    import paddle

    from ernie_vilg.config import load_config
    from ernie_vilg.vq.parallel_tokenize import tokenize_manifest_parallel
    from ernie_vilg.data.shapes import write_shapes_dataset
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.vq.tokenize_images import tokenize_manifest
    from ernie_vilg.checkpoint_io import save_checkpoint
    from ernie_vilg.vq.registry import build_tokenizer

    cfg = load_config(None, ["VQ.hidden_channels=8", "VQ.channel_mult=[1, 1, 1]", "VQ.downsample_factor=4",
                             "VQ.codebook_size=32", "VQ.embed_dim=8", "Data.image_size=16"])
    paddle.seed(0)
    ckpt = save_checkpoint(tmp_path / "vq", 0, cfg, build_tokenizer(cfg.VQ).state_dict())
    data = tmp_path / "shapes"
    write_shapes_dataset(data, 23, 0, 0, size=16, seed=0)
    with (data / "train.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("{bad line\n")
        fh.write(json.dumps({"image": "images/missing.png", "text": "不存在"}, ensure_ascii=False) + "\n")
    single = tokenize_manifest(ckpt, data / "train.jsonl", tmp_path / "single", batch_size=8, shard_size=5)
    par = tokenize_manifest_parallel(ckpt, data / "train.jsonl", tmp_path / "par", workers=2, batch_size=8,
                                     shard_size=5)
    assert par["count"] == single["count"] == 23
    assert par["skipped_lines"] == single["skipped_lines"] == 1
    assert par["skipped_images"] == single["skipped_images"] == 1
    a, b = TokenShards(tmp_path / "single"), TokenShards(tmp_path / "par")
    assert b.info["workers"] == 2 and {s["ids"][:4] for s in b.info["shards"]} == {"w000", "w001"}
    for i in range(23):
        assert np.array_equal(a[i].image_ids, b[i].image_ids) and a[i].text == b[i].text
        assert a[i].meta == b[i].meta
    assert not [p for p in (tmp_path / "par").iterdir() if p.is_dir()]  # parts merged and removed


def test_random_text_picks_a_reference_deterministically(tmp_path):
    w = TokenShardWriter(tmp_path, GRID, K, shard_size=8)
    for i in range(16):
        w.add(np.zeros((GRID, GRID)), f"a{i}", [f"a{i}", f"b{i}", f"c{i}"], {})
    w.close()

    def texts(loader, n=48):
        return [(s["index"], s["text"]) for _, s in zip(range(n), loader.samples())]

    a = texts(StreamingTokenLoader(tmp_path, 1, seed=2, buffer_size=4, random_text=True))
    b = texts(StreamingTokenLoader(tmp_path, 1, seed=2, buffer_size=4, random_text=True))
    assert a == b
    assert all(t[1:] == str(i) for i, t in a) and {t[0] for _, t in a} == {"a", "b", "c"}


def test_linked_folders_read_all_rows_in_order_and_refuse_mismatches(tmp_path):
    """tools/combine_shards.py: one folder over several (symlinks), same rows in source order; a
    second tokenizer's grid or an existing output folder is refused by name."""
    import subprocess
    import sys
    from pathlib import Path

    from ernie_vilg.vq.parallel_tokenize import link_shard_folders
    from ernie_vilg.data.token_shards import TokenShards

    a, b = tmp_path / "a", tmp_path / "b"
    make_folder(a, n=7, shard_size=4)
    make_folder(b, n=5, shard_size=4)  # same shard file names as a
    info = link_shard_folders([a, b], tmp_path / "ab")
    assert info["count"] == 12 and len(info["shards"]) == 4 and info["grid"] == GRID
    rows = TokenShards(tmp_path / "ab")
    assert [rows[i].text for i in range(12)] == [f"t{i}" for i in range(7)] + [f"t{i}" for i in range(5)]
    np.testing.assert_array_equal(rows.ids(8), np.full((GRID, GRID), 1))
    with pytest.raises(TokenShardError, match="already a token shard folder"):
        link_shard_folders([a], tmp_path / "ab")
    w = TokenShardWriter(tmp_path / "g3", GRID + 1, K, shard_size=4)
    w.add(np.zeros((GRID + 1, GRID + 1)), "x", ["x"], {})
    w.close()
    with pytest.raises(TokenShardError, match="grid"):
        link_shard_folders([a, tmp_path / "g3"], tmp_path / "bad")
    tool = Path(__file__).resolve().parents[1] / "tools" / "combine_shards.py"
    out = subprocess.run([sys.executable, str(tool), str(a), str(tmp_path / "missing"), "--out", str(tmp_path / "c")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "missing/info.json: not found" in out.stderr
    out = subprocess.run([sys.executable, str(tool), str(b), str(a), "--out", str(tmp_path / "ba")],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["count"] == 12
    assert TokenShards(tmp_path / "ba")[5].text == "t0"
