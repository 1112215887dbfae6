"""Contrastive reranker: InfoNCE trains, scores lie in [0, 1], matching pairs outscore mismatched
ones after brief training on the shapes world, best-of-N ranking, checkpoint round trip."""
import json

import numpy as np
import paddle
import pytest

from ernie_vilg.config import RerankerConfig, load_config
from ernie_vilg.data.images import load_image
from ernie_vilg.data.manifest import read_manifest
from ernie_vilg.data.shapes import write_shapes_dataset
from ernie_vilg.models.reranker import build_dual_encoder, load_reranker, rank_candidates
from ernie_vilg.stages import prepare
from ernie_vilg.training.trainer import Trainer

TINY = ["Data.image_size=32", "Data.batch_size=32", "Data.max_text_len=48",
        "Reranker.embed_dim=32", "Reranker.text_layers=1", "Reranker.text_hidden=48", "Reranker.text_heads=2",
        "Reranker.patch_size=4", "Reranker.image_channels=[32, 48]", "Reranker.pool_grid=4",
        "Optimizer.lr=0.003", "Optimizer.warmup_steps=5", "Optimizer.weight_decay=0.0",
        "Train.log_every=10", "Train.eval_every=0", "Train.save_every=0", "Train.eval_samples=48",
        "Train.progress_bar=False", "Global.num_threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One object per image (shape, colour, cell), 32 px: learnable in ~100 small steps."""
    root = tmp_path_factory.mktemp("reranker")
    data = root / "data"
    write_shapes_dataset(data, 256, 48, 0, size=32, seed=0, max_objects=1, text_template="t1")
    cfg = load_config(None, TINY + [
        "Global.stage=reranker", f"Global.output_dir={root / 'run'}", "Train.max_steps=60",
        f"Data.train_manifest={data / 'train.jsonl'}", f"Data.val_manifest={data / 'val.jsonl'}"])
    module = prepare(cfg)
    trainer = Trainer(module.cfg, module)
    result = trainer.fit()
    return {"root": root, "data": data, "result": result, "history": trainer.history, "cfg": cfg}


def test_infonce_loss_decreases(trained):
    train = [h for h in trained["history"] if h["split"] == "train"]
    assert train[-1]["contrastive"] < 0.6 * train[0]["contrastive"]
    assert train[-1]["batch_i2t_acc"] > train[0]["batch_i2t_acc"]


def test_matching_pairs_outscore_mismatched_on_held_out_images(trained):
    val = trained["result"]["val"]
    assert val["score_match"] > val["score_mismatch"] + 0.2, val
    assert val["i2t_top1"] > 4 / 48, val  # well above chance (1/48)
    assert val["threshold_acc"] > 0.7, val


def test_scores_are_in_unit_interval_and_checkpoint_round_trips(trained):
    reranker = load_reranker(trained["result"]["checkpoint"])
    recs = read_manifest(trained["data"] / "val.jsonl")[:8]
    images = np.stack([load_image(r.image_path, 32) for r in recs])
    texts = [r.text for r in recs]
    s_match = reranker.score(images, texts)
    s_mis = reranker.score(images, texts[1:] + texts[:1])
    for s in (s_match, s_mis):
        assert s.shape == (8,) and np.all((s >= 0) & (s <= 1))
    assert s_match.mean() > s_mis.mean()
    # the same weights give the same scores as the module's model at the end of training
    again = load_reranker(trained["root"] / "run")
    np.testing.assert_allclose(again.score(images, texts), s_match, rtol=1e-5)
    with pytest.raises(ValueError, match="one to one"):
        reranker.score(images, texts[:3])


def test_rank_candidates_puts_the_described_image_first(trained):
    reranker = load_reranker(trained["result"]["checkpoint"])
    recs = read_manifest(trained["data"] / "val.jsonl")[:40]
    images = np.stack([load_image(r.image_path, 32) for r in recs])
    hits = 0
    for i in range(10):
        order, scores = rank_candidates(reranker, images[:10], recs[i].text)
        assert sorted(order.tolist()) == list(range(10))
        assert np.all(np.diff(scores[order]) <= 0)  # best first
        hits += int(order[0] == i)
    assert hits >= 3  # chance is 1 in 10 per text
    # other image sizes are resized to the reranker's
    big = paddle.nn.functional.interpolate(paddle.to_tensor(images[:4]), size=[64, 64])
    order, scores = rank_candidates(reranker, big, recs[0].text)
    assert scores.shape == (4,)


def test_filter_similarity_rule_with_a_trained_reranker(trained, tmp_path):
    from ernie_vilg.data.filter import filter_manifest
    from ernie_vilg.models.reranker import reranker_scorer

    src = [json.loads(l) for l in (trained["data"] / "val.jsonl").read_text(encoding="utf-8").splitlines()][:24]
    lines = []
    for i, rec in enumerate(src):  # even lines: true caption; odd lines: another image's caption
        text = rec["text"] if i % 2 == 0 else src[(i + 7) % len(src)]["text"]
        lines.append({"image": str(trained["data"] / rec["image"]), "text": text, "i": i})
    m = tmp_path / "m.jsonl"
    m.write_text("".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines), encoding="utf-8")
    summary = filter_manifest(m, tmp_path / "k.jsonl", tmp_path / "r.jsonl",
                              scorer=reranker_scorer(trained["result"]["checkpoint"]))
    kept = [json.loads(l)["i"] for l in (tmp_path / "k.jsonl").read_text(encoding="utf-8").splitlines()]
    rejected = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary.read == 24
    assert all(r["reject_reason"].startswith("low_similarity(") for r in rejected)
    true_kept = sum(1 for i in kept if i % 2 == 0)
    false_kept = sum(1 for i in kept if i % 2 == 1)
    assert true_kept > false_kept + 3


def test_calibration_head_does_not_move_the_embeddings():
    cfg = RerankerConfig(embed_dim=8, text_layers=1, text_hidden=16, text_heads=2, image_channels=[8], pool_grid=2)
    paddle.seed(0)
    model = build_dual_encoder(cfg, 20, 8, 0)
    out = model(paddle.randn([4, 3, 16, 16]), paddle.randint(1, 20, [4, 8]))
    out.calibration_loss.backward()
    assert model.calib_a.grad is not None
    assert model.image.proj.weight.grad is None or float(model.image.proj.weight.grad.abs().sum()) == 0.0
    assert 0.0 < float(1.0 / model.logit_scale()) < 1.0
