"""Caption fine-tuning (stage caption_finetune), the Trainer's best-checkpoint hook and the
streamed vilg training batches."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from toy_stage import ToyStage, toy_overrides
from vilg_fixture import CHARS, SPECIAL, write_tiny_vilg_data

from ernie_vilg.config import ConfigError, load_config
from ernie_vilg.checkpoint_io import list_checkpoints, load_model_state, read_meta
from ernie_vilg.stages import prepare
from ernie_vilg.training.module import StepContext
from ernie_vilg.training.trainer import BEST_DIR, Trainer

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# The Trainer keeps the best validation's weights (general hook: a stage's `best_metric`)
# --------------------------------------------------------------------------------------------
class ScriptedStage(ToyStage):
    """The toy stage whose validation reports a scripted score per step."""

    best_metric = "score"

    def __init__(self, cfg, scores: dict[int, float]) -> None:
        super().__init__(cfg)
        self.scores = scores

    def validate(self, model, step):
        return {"score": self.scores[step]} if step in self.scores else {}


def test_trainer_keeps_best_checkpoint_and_remembers_it_across_resume(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, toy_overrides(out, 6, 4, **{"Train.eval_every": 2, "Train.save_every": 2}))
    trainer = Trainer(cfg, ScriptedStage(cfg, {2: 1.0, 4: 3.0, 6: 2.0}))
    trainer.fit()
    best = out / BEST_DIR
    meta = read_meta(best)
    assert meta["best_metric"] == "score" and meta["best_value"] == 3.0 and meta["step"] == 4
    assert (best / "toy.txt").is_file() and not (best / "optimizer.pdopt").exists()  # extras, no optimizer
    steps = {int(p.name.split("-")[1]): p for p in list_checkpoints(out / "checkpoints")}
    weights = load_model_state(best)
    for key, value in load_model_state(steps[4]).items():  # the step-4 weights, not the last ones
        np.testing.assert_array_equal(weights[key].numpy(), value.numpy())
    assert any(not np.array_equal(weights[k].numpy(), v.numpy()) for k, v in load_model_state(steps[6]).items())

    # resumed: the remembered best (3.0) is not replaced by a worse score, a better one replaces it
    cfg = load_config(None, toy_overrides(out, 8, 4, **{"Train.eval_every": 2, "Train.save_every": 2}))
    resumed = Trainer(cfg, ScriptedStage(cfg, {8: 2.5}))
    assert resumed.best_value == 3.0
    resumed.fit()
    assert read_meta(best)["step"] == 4
    cfg = load_config(None, toy_overrides(out, 10, 4, **{"Train.eval_every": 2, "Train.save_every": 2}))
    Trainer(cfg, ScriptedStage(cfg, {10: 4.0})).fit()
    assert read_meta(best)["step"] == 10 and read_meta(best)["best_value"] == 4.0


def test_stages_without_best_metric_write_no_best_folder(tmp_path):
    cfg = load_config(None, toy_overrides(tmp_path, 2, 4))
    Trainer(cfg, ToyStage(cfg)).fit()
    assert not (tmp_path / BEST_DIR).exists()


# --------------------------------------------------------------------------------------------
# Streamed vilg training batches
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paraphrase_shards(tmp_path_factory) -> tuple[Path, object]:
    """24 items in 4 shards (one per stream partition), each with two reference texts of
    different lengths."""
    from ernie_vilg.data.token_shards import TokenShardWriter
    from ernie_vilg.text.tokenizer import TextTokenizer

    root = tmp_path_factory.mktemp("stream")
    (root / "vocab.txt").write_text("\n".join(SPECIAL + list(CHARS)) + "\n", encoding="utf-8")
    rng = np.random.default_rng(1)
    writer = TokenShardWriter(root / "train", 4, 32, shard_size=6)
    for i in range(24):
        a, b = "".join(rng.choice(list(CHARS), size=4)), "".join(rng.choice(list(CHARS), size=7))
        writer.add(rng.integers(0, 32, size=(4, 4)), a, [a, b], {"image": f"{i}.png"})
    writer.close()
    return root / "train", TextTokenizer(root / "vocab.txt")


def rows(batch) -> list[tuple[bytes, tuple[int, ...]]]:
    """(image ids, unpadded text ids) per item, order-free comparable."""
    text = batch["text_ids"].numpy()
    return sorted((img.tobytes(), tuple(int(t) for t in ids if t != 0))
                  for img, ids in zip(batch["image_ids"].numpy(), text))


def test_stream_batches_same_global_batch_for_any_rank_count_and_exact_resume(paraphrase_shards):
    from ernie_vilg.stages.vilg import StreamBatches

    path, tok = paraphrase_shards
    one = iter(StreamBatches(path, tok, 8, 16, seed=3, partitions=4, buffer_size=3))
    ranks = [iter(StreamBatches(path, tok, 4, 16, seed=3, rank=r, world_size=2, partitions=4, buffer_size=3))
             for r in range(2)]
    seen_images, choices = [], {}
    for _ in range(12):  # 4 epochs of 24 items
        batch = next(one)
        assert rows(batch) == sorted(rows(next(ranks[0])) + rows(next(ranks[1])))
        text = batch["text_ids"].numpy()
        lengths = (text != tok.pad_id).sum(1)
        assert text.shape[1] == lengths.max()  # padded to the batch's longest only
        for img, n in zip(batch["image_ids"].numpy(), lengths):
            seen_images.append(img.tobytes())
            choices.setdefault(img.tobytes(), set()).add(int(n))
    first_epoch = seen_images[:24]
    assert len(set(first_epoch)) == 24  # an epoch visits every item once
    assert all(n in (6, 9) for c in choices.values() for n in c)  # [CLS] + 4 or 7 characters + [SEP]
    assert sum(len(c) == 2 for c in choices.values()) >= 6  # both references get picked across visits

    batches = StreamBatches(path, tok, 8, 16, seed=3, partitions=4, buffer_size=3)
    it = iter(batches)
    for _ in range(4):
        next(it)
    state = batches.state_dict()
    expected = [rows(next(it)) for _ in range(4)]
    again = StreamBatches(path, tok, 8, 16, seed=3, partitions=4, buffer_size=3)
    again.set_state_dict(state)
    it2 = iter(again)
    assert [rows(next(it2)) for _ in range(4)] == expected


# --------------------------------------------------------------------------------------------
# Caption fine-tuning
# --------------------------------------------------------------------------------------------
def tiny_cfg(data: list[str], out: Path, stage_overrides: list[str], config: str = "vilg/tiny.yaml"):
    common = ["Train.progress_bar=false", "Train.max_minutes=0.0", f"Global.output_dir={out}"]
    return load_config(REPO / "configs" / config, data + common + stage_overrides)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[list[str], Path]:
    """(data overrides, checkpoint) of a tiny vilg model pre-trained briefly on the tiny shards."""
    root = tmp_path_factory.mktemp("pretrain")
    data = write_tiny_vilg_data(root / "data")
    cfg = tiny_cfg(data, root / "run", ["Train.max_steps=20", "Train.eval_every=0", "Train.save_every=0",
                                        "Data.batch_size=8", "Optimizer.lr=0.003"])
    module = prepare(cfg)
    result = Trainer(module.cfg, module).fit()
    return data, Path(result["checkpoint"])


def finetune_overrides(ckpt: Path, *extra: str) -> list[str]:
    return ["Global.stage=caption_finetune", f"Finetune.init_from={ckpt}", *extra]


def test_finetune_config_errors_name_the_checkpoint(pretrained, tmp_path):
    data, ckpt = pretrained
    missing = tmp_path / "no_such_ckpt"
    with pytest.raises(ConfigError, match=f"Finetune.init_from={missing}.*not found"):
        prepare(tiny_cfg(data, tmp_path / "a", finetune_overrides(missing)))
    with pytest.raises(ConfigError, match="Finetune.init_from is empty"):
        prepare(tiny_cfg(data, tmp_path / "b", ["Global.stage=caption_finetune"]))
    with pytest.raises(ConfigError, match="Finetune.directions"):
        prepare(tiny_cfg(data, tmp_path / "c", finetune_overrides(ckpt, "Finetune.directions=txt2img")))
    other_vocab = tmp_path / "vocab.txt"
    other_vocab.write_text("\n".join(SPECIAL + list("甲乙丙")) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"Finetune.init_from={ckpt}: Data.vocab_file={other_vocab} differs"):
        prepare(tiny_cfg(data, tmp_path / "d", finetune_overrides(ckpt, f"Data.vocab_file={other_vocab}")))
    other_grid = write_tiny_vilg_data(tmp_path / "grid3", grid=3)
    with pytest.raises(ConfigError, match=f"Finetune.init_from={ckpt}: the checkpoint has Model.image_grid=4"):
        prepare(tiny_cfg(other_grid, tmp_path / "e", finetune_overrides(ckpt)))


def test_finetune_starts_from_the_checkpoint_and_trains_the_chosen_directions(pretrained, tmp_path):
    data, ckpt = pretrained
    cfg = tiny_cfg(data, tmp_path / "ft", finetune_overrides(ckpt, "Model.hidden_size=64"))
    module = prepare(cfg)
    # the architecture comes from the checkpoint; the resolver returns a copy, the input is untouched
    assert module.cfg.Model.hidden_size == 32 and cfg.Model.hidden_size == 64
    model = module.build_model()
    for key, value in load_model_state(ckpt).items():
        np.testing.assert_array_equal(model.state_dict()[key].numpy(), value.numpy())
    batch = next(iter(module.train_batches(0, 1)))
    loss, logs = module.training_step(StepContext(model, model, 0), batch)
    assert set(logs) == {"loss_img2txt"} and float(loss) == pytest.approx(logs["loss_img2txt"])

    both = prepare(tiny_cfg(data, tmp_path / "ft2", finetune_overrides(ckpt, "Finetune.directions=both")))
    loss2, logs2 = both.training_step(StepContext(model, model, 0), batch)
    assert set(logs2) == {"loss_txt2img", "loss_img2txt"}
    assert logs2["loss_img2txt"] == pytest.approx(logs["loss_img2txt"], rel=1e-5)
    assert float(loss2) == pytest.approx(logs2["loss_txt2img"] + logs2["loss_img2txt"], rel=1e-5)


def test_caption_scores_follow_the_decoding_settings(pretrained):
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.pipeline import load_bundle
    from ernie_vilg.generation.captions import caption_scores

    data, ckpt = pretrained
    bundle = load_bundle(ckpt)
    records = [TokenShards(data[1].split("=", 1)[1])[i] for i in range(6)]
    gen = bundle.cfg.Generation
    gen.decode_strategy, gen.beam_size, gen.max_text_len = "beam", 1, 16
    beam1, rows = caption_scores(bundle.model, bundle.text_tokenizer, records, gen)
    gen.decode_strategy = "greedy"
    greedy, greedy_rows = caption_scores(bundle.model, bundle.text_tokenizer, records, gen)
    assert {"caption_BLEU-4", "caption_ROUGE-L", "caption_CIDEr"} <= set(greedy)
    assert [r["caption"] for r in rows] == [r["caption"] for r in greedy_rows]  # beam 1 == greedy
    gen.decode_strategy = "sampling"
    with pytest.raises(ConfigError, match="decode_strategy"):
        caption_scores(bundle.model, bundle.text_tokenizer, records, gen)


@pytest.mark.slow
def test_finetune_end_to_end_keeps_best_by_cider_and_beats_the_pretrained_model(pretrained, tmp_path):
    from ernie_vilg.generation.captions import score_bundle
    from ernie_vilg.pipeline import load_bundle

    data, ckpt = pretrained
    train = data[1].split("=", 1)[1]
    out = tmp_path / "ft"
    cfg = tiny_cfg(data, out, finetune_overrides(
        ckpt, f"Data.val_shards={train}", "Train.max_steps=80", "Train.eval_every=20", "Train.save_every=40",
        "Data.batch_size=8", "Optimizer.lr=0.003", "Optimizer.warmup_steps=5", "Train.eval_samples=32",
        "Generation.decode_strategy=beam", "Generation.beam_size=2", "Generation.max_text_len=16"))
    module = prepare(cfg)
    trainer = Trainer(module.cfg, module)
    trainer.fit()
    assert all(set(r) >= {"loss_img2txt"} and "loss_txt2img" not in r for r in trainer.history if r["split"] == "train")
    val = [r for r in trainer.history if r["split"] == "val"]
    assert [r["step"] for r in val] == [20, 40, 60, 80]
    best = out / BEST_DIR
    meta = json.loads((best / "meta.json").read_text())
    assert meta["best_metric"] == "caption_CIDEr" and meta["stage"] == "caption_finetune"
    assert meta["best_value"] == pytest.approx(max(r["caption_CIDEr"] for r in val))
    assert meta["step"] == max(val, key=lambda r: r["caption_CIDEr"])["step"]
    # the same split, the same decoding: the best folder scores what validation said, and
    # fine-tuning beats (or at worst equals) the pre-trained weights it started from
    after, _ = score_bundle(load_bundle(best), train, cfg.Generation)
    before, _ = score_bundle(load_bundle(ckpt), train, cfg.Generation)
    assert after["caption_CIDEr"] == pytest.approx(meta["best_value"], rel=1e-6)
    print(f"CIDEr before {before['caption_CIDEr']:.2f} after {after['caption_CIDEr']:.2f}")
    assert after["caption_CIDEr"] >= before["caption_CIDEr"]
    assert after["caption_CIDEr"] > 0.0
