"""Generative VQA (paper sec. 4.4): prefix masks in the model, loss only on answers, cached
decoding == uncached, the stage's batches, init from a vilg checkpoint, and a tiny end-to-end run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from ernie_vilg.config import ModelConfig
from ernie_vilg.generation.decoding import (
    CachedStepper,
    FullStepper,
    SamplingParams,
    TextSpecials,
    beam_search_answer_tokens,
    generate_answer_tokens,
)
from ernie_vilg.models.sparse_masks import Direction
from ernie_vilg.models.transformer import ErnieViLG
from ernie_vilg.data.vqa_batches import encode_qa
from ernie_vilg.generation.vqa import score_answers
from ernie_vilg.models.losses import answer_loss_mask
from ernie_vilg.stages.vqa import vqa_loss

REPO = Path(__file__).resolve().parents[1]
SPECIALS = TextSpecials(bos_id=2, eos_id=3, pad_id=0)
IMPLS = ("dense", "sparse_reference", "sparse_blockwise")
G, L = 3, 10


def tiny_model(impl: str = "sparse_blockwise", seed: int = 0, image_sees_prefix: bool = False) -> ErnieViLG:
    paddle.seed(seed)
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_heads=4, conv_kernel=3, text_vocab_size=30,
                      image_vocab_size=20, max_text_len=L, image_grid=G, init_std=0.3, attention_impl=impl,
                      image_sees_prefix=image_sees_prefix)
    model = ErnieViLG(cfg)
    model.eval()
    return model


rng = np.random.default_rng(0)
IMAGES = rng.integers(0, 20, (3, G, G))
QUESTIONS = rng.integers(5, 30, (3, 4))  # [CLS] q q [SEP]: P = 4 for the whole batch
QUESTIONS[:, 0], QUESTIONS[:, -1] = 2, 3


# ------------------------------------------------------------------------------ masks in the model
@pytest.mark.parametrize("impl", IMPLS)
def test_question_is_bidirectional_and_never_sees_the_answer(impl: str) -> None:
    model = tiny_model(impl)
    text = rng.integers(5, 30, (2, L))
    P = 4
    prefix = np.array([P, P])
    h = model.hidden_states(paddle.to_tensor(text), paddle.to_tensor(IMAGES[:2]), Direction.IMG2TXT, prefix).numpy()
    n = G * G
    later_question = text.copy()
    later_question[:, P - 1] = 4  # the question's last token
    h2 = model.hidden_states(paddle.to_tensor(later_question), paddle.to_tensor(IMAGES[:2]), Direction.IMG2TXT,
                             prefix).numpy()
    np.testing.assert_allclose(h2[:, :n], h[:, :n], atol=1e-6)  # the image never sees text
    assert np.abs(h2[:, n] - h[:, n]).max() > 1e-4  # [CLS] sees a question token to its right
    answer = text.copy()
    answer[:, P + 1:] = 7  # change the answer after its first token
    h3 = model.hidden_states(paddle.to_tensor(answer), paddle.to_tensor(IMAGES[:2]), Direction.IMG2TXT,
                             prefix).numpy()
    np.testing.assert_allclose(h3[:, :n + P + 1], h[:, :n + P + 1], atol=1e-6)  # source + first answer


@pytest.mark.parametrize("impl", IMPLS)
def test_image_sees_the_question_only_when_configured(impl: str) -> None:
    """`Model.image_sees_prefix`: image rows change with the question, never with the answer; the
    block-wise core equals the reference."""
    text = rng.integers(5, 30, (2, L))
    P, n = 4, G * G
    prefix = np.array([P, P])
    other_question, other_answer = text.copy(), text.copy()
    other_question[:, 1] = 4
    other_answer[:, P:] = 7
    model = tiny_model(impl, image_sees_prefix=True)
    h = lambda t: model.hidden_states(paddle.to_tensor(t), paddle.to_tensor(IMAGES[:2]), Direction.IMG2TXT,
                                      prefix).numpy()
    base = h(text)
    assert np.abs(h(other_question)[:, :n] - base[:, :n]).max() > 1e-4  # early fusion
    np.testing.assert_allclose(h(other_answer)[:, :n + P], base[:, :n + P], atol=1e-6)  # source only
    if impl == "sparse_blockwise":  # same seed, same weights: the two sparse cores agree
        ref = tiny_model("sparse_reference", image_sees_prefix=True)
        np.testing.assert_allclose(ref.hidden_states(paddle.to_tensor(text), paddle.to_tensor(IMAGES[:2]),
                                                     Direction.IMG2TXT, prefix).numpy(), base, atol=1e-5)


def test_prefix_zero_forward_is_the_caption_forward() -> None:
    model = tiny_model()
    text = paddle.to_tensor(rng.integers(5, 30, (2, L)))
    plain = model(text, paddle.to_tensor(IMAGES[:2]), Direction.IMG2TXT).numpy()
    zero = model(text, paddle.to_tensor(IMAGES[:2]), Direction.IMG2TXT, np.zeros(2, dtype=np.int64)).numpy()
    np.testing.assert_allclose(zero, plain, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="image-to-text"):
        model(text, paddle.to_tensor(IMAGES[:2]), Direction.TXT2IMG, np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="text_prefix"):
        model(text, paddle.to_tensor(IMAGES[:2]), Direction.IMG2TXT, np.array([1, L + 1]))


# ------------------------------------------------------------------------------ loss on answers only
def test_answer_loss_mask_covers_answer_and_its_sep_only() -> None:
    # [CLS] q1 q2 [SEP] a1 [SEP] PAD   (P = 4)   and   [CLS] q1 [SEP] a1 a2 [SEP] PAD (P = 3)
    text = paddle.to_tensor(np.array([[2, 9, 9, 3, 7, 3, 0], [2, 9, 3, 7, 8, 3, 0]]))
    mask = answer_loss_mask(text, paddle.to_tensor(np.array([4, 3])), pad_id=0).numpy()
    # row j predicts text j + 1
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 0]])


def test_vqa_loss_is_the_mean_nll_of_the_answer_tokens() -> None:
    model = tiny_model("dense")
    text = np.array([[2, 9, 9, 3, 7, 3, 0, 0], [2, 9, 3, 7, 8, 3, 0, 0]])
    batch = {"text_ids": paddle.to_tensor(text), "image_ids": paddle.to_tensor(IMAGES[:2]),
             "text_prefix": paddle.to_tensor(np.array([4, 3]))}
    loss = float(vqa_loss(model, batch, pad_id=0))
    logits = model(batch["text_ids"], batch["image_ids"], Direction.IMG2TXT, batch["text_prefix"]).numpy()
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    picks = [(0, 3, 7), (0, 4, 3), (1, 2, 7), (1, 3, 8), (1, 4, 3)]  # (sample, row, answer target)
    expected = -np.mean([logp[b, j, t] for b, j, t in picks])
    assert loss == pytest.approx(expected, rel=1e-5)
    # a question token's prediction does not enter the loss: gradients of its logits are zero
    logits_t = model(batch["text_ids"], batch["image_ids"], Direction.IMG2TXT, batch["text_prefix"])
    logits_t.retain_grads()
    from ernie_vilg.models.losses import token_nll

    token_nll(logits_t, batch["text_ids"][:, 1:],
              answer_loss_mask(batch["text_ids"], batch["text_prefix"], 0)).backward()
    grad = np.abs(logits_t.grad.numpy()).sum(-1)
    assert grad[0, :3].max() == 0 and grad[1, :2].max() == 0 and grad[0, 5:].max() == 0
    assert grad[0, 3] > 0 and grad[1, 2] > 0


# ------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("image_sees_prefix", [False, True])
def test_cached_and_uncached_answer_logits_match(impl: str, image_sees_prefix: bool) -> None:
    model = tiny_model(impl, image_sees_prefix=image_sees_prefix)
    cached = CachedStepper(model, Direction.IMG2TXT, L)
    full = FullStepper(model, Direction.IMG2TXT, pad_id=0, text_len=L)
    src = IMAGES.reshape(3, -1)
    np.testing.assert_allclose(cached.start(src, QUESTIONS), full.start(src, QUESTIONS), atol=1e-4)
    assert cached.cache.length == G * G + QUESTIONS.shape[1]
    for tok in rng.integers(5, 30, (L - QUESTIONS.shape[1] - 1, 3)):
        np.testing.assert_allclose(cached.step(tok), full.step(tok), atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("image_sees_prefix", [False, True])
def test_greedy_and_beam_answers_are_identical_with_and_without_cache(impl: str, image_sees_prefix: bool) -> None:
    model = tiny_model(impl, seed=3, image_sees_prefix=image_sees_prefix)
    greedy = [generate_answer_tokens(model, IMAGES, QUESTIONS, SPECIALS, SamplingParams(), use_cache=c)
              for c in (True, False)]
    assert greedy[0] == greedy[1]
    assert all(len(a) <= L - QUESTIONS.shape[1] for a in greedy[0])
    beams = [beam_search_answer_tokens(model, IMAGES, QUESTIONS, SPECIALS, beam_size=3, use_cache=c)
             for c in (True, False)]
    assert beams[0] == beams[1]
    assert beam_search_answer_tokens(model, IMAGES, QUESTIONS, SPECIALS, beam_size=1) == greedy[0]


def test_answers_depend_on_the_question() -> None:
    model = tiny_model(seed=5)
    other = QUESTIONS.copy()
    other[:, 1:3] = rng.integers(5, 30, (3, 2))
    a = CachedStepper(model, Direction.IMG2TXT, L).start(IMAGES.reshape(3, -1), QUESTIONS)
    b = CachedStepper(model, Direction.IMG2TXT, L).start(IMAGES.reshape(3, -1), other)
    assert np.abs(a - b).max() > 1e-3


# ------------------------------------------------------------------------------ data, scores, init
class _Tok:
    cls_id, sep_id, pad_id = 2, 3, 0

    def encode(self, text: str, max_len: int) -> list[int]:
        return [2, *[10 + ord(c) % 20 for c in text][: max_len - 2], 3]


def test_encode_qa_layout_and_truncation() -> None:
    ids, P = encode_qa(_Tok(), "abc", "de", max_question_len=8, max_answer_len=4)
    assert P == 5 and ids[0] == 2 and ids[4] == 3 and ids[-1] == 3 and len(ids) == 8
    ids, P = encode_qa(_Tok(), "abcdefgh", "defgh", max_question_len=5, max_answer_len=3)
    assert P == 5 and len(ids) == 8 and ids[4] == 3 and ids[-1] == 3


def test_score_answers_per_question_kind() -> None:
    out = score_answers(["红色", "两个", "圆形"], [["红色"], ["三个"], ["圆形"]], ["colour", "count", "shape"])
    assert out["exact_match"] == pytest.approx(200 / 3)
    assert out["em_count"] == 0 and out["em_colour"] == 100 and out["n_shape"] == 1


def write_tiny_vqa(root: Path, items: int = 48, grid: int = 4, codebook: int = 16) -> list[str]:
    """VQA token shards whose answer is a function of the image ids and the question."""
    from ernie_vilg.data.token_shards import TokenShardWriter
    from vilg_fixture import SPECIAL

    colours, kinds = "红绿蓝黄", ("左", "右")
    vocab = SPECIAL + list("红绿蓝黄色左右边是什么？的")
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    rng_ = np.random.default_rng(1)
    for split, count in (("train", items), ("val", 8)):
        writer = TokenShardWriter(root / split, grid, codebook, shard_size=32)
        for i in range(count):
            ids = rng_.integers(0, codebook, (grid, grid))
            side = i % 2
            answer = colours[int(ids[0, side * (grid - 1)]) % 4] + "色"
            q = f"{kinds[side]}边是什么色？"
            writer.add(ids, answer, [answer], {"image": f"{i}.png", "question": q, "qtype": kinds[side],
                                               "id": f"{split}-{i}"})
        writer.close()
    return [f"Data.vocab_file={root / 'vocab.txt'}", f"Data.train_shards={root / 'train'}",
            f"Data.val_shards={root / 'val'}", "Data.max_text_len=24", "Model.max_text_len=24",
            "VQA.max_question_len=16", "VQA.max_answer_len=8"]


def test_vqa_batches_are_resumable_and_carry_the_prefix(tmp_path: Path) -> None:
    from ernie_vilg.data.token_shards import TokenShards
    from ernie_vilg.data.vqa_batches import VqaBatches
    from ernie_vilg.text.tokenizer import TextTokenizer

    write_tiny_vqa(tmp_path)
    tok = TextTokenizer(tmp_path / "vocab.txt")
    make = lambda: VqaBatches(TokenShards(tmp_path / "train"), tok, 5, 16, 8, seed=3)  # noqa: E731
    batches = make()
    it = iter(batches)
    first = next(it)
    text, prefix = first["text_ids"].numpy(), first["text_prefix"].numpy()
    for row, p in zip(text, prefix):
        assert row[0] == tok.cls_id and row[p - 1] == tok.sep_id and tok.decode(row[p:]).endswith("色")
    state = batches.state_dict()
    expected = next(it)
    again = make()
    again.set_state_dict(state)
    got = next(iter(again))
    np.testing.assert_array_equal(got["text_ids"].numpy(), expected["text_ids"].numpy())
    np.testing.assert_array_equal(got["text_prefix"].numpy(), expected["text_prefix"].numpy())


def test_init_from_vilg_matches_text_rows_by_token(tmp_path: Path) -> None:
    from ernie_vilg.training.warm_start import init_by_token as init_from_vilg

    src = tiny_model(seed=1)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    src_vocab = [f"t{i}" for i in range(30)]
    (ckpt / "vocab.txt").write_text("\n".join(src_vocab) + "\n", encoding="utf-8")
    paddle.save(src.state_dict(), str(ckpt / "model.pdparams"))
    import yaml

    from ernie_vilg.config import Config

    cfg = Config()
    cfg.Model = src.cfg
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    (ckpt / "meta.json").write_text(json.dumps({"step": 1}), encoding="utf-8")
    paddle.seed(9)
    cfg_dst = ModelConfig(**{**src.cfg.__dict__, "text_vocab_size": 32, "max_text_len": L + 2})
    dst = ErnieViLG(cfg_dst)
    dst_vocab = ["new0"] + src_vocab[::-1] + ["new1"]  # reversed order + 2 unseen tokens
    before_new = dst.tok_emb_txt.weight.numpy()[[0, 31]].copy()
    counts = init_from_vilg(dst, ckpt, dst_vocab)
    assert counts["vocab_rows"] == 30
    w_src, w_dst = src.tok_emb_txt.weight.numpy(), dst.tok_emb_txt.weight.numpy()
    np.testing.assert_array_equal(w_dst[1:31], w_src[::-1])
    np.testing.assert_array_equal(w_dst[[0, 31]], before_new)
    np.testing.assert_array_equal(dst.head_txt.weight.numpy(), w_dst)  # still tied
    np.testing.assert_array_equal(dst.pos_emb_txt.weight.numpy()[:L], src.pos_emb_txt.weight.numpy())
    np.testing.assert_array_equal(dst.blocks[2].attn.qkv.weight.numpy(), src.blocks[2].attn.qkv.weight.numpy())


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_tiny_vqa_training_and_tool(tmp_path: Path) -> None:
    overrides = write_tiny_vqa(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "tools/train.py"), "-c", str(REPO / "configs/vilg/tiny.yaml"),
           "-o", "Global.stage=vqa", "-o", f"Global.output_dir={run}", "-o", "Global.num_threads=1",
           "-o", "Train.progress_bar=false", "-o", "Train.max_steps=6", "-o", "Train.eval_samples=8"]
    for o in overrides:
        cmd += ["-o", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 6 and "vqa_exact_match" in result["val"] and "val_loss_answer" in result["val"]
    out = tmp_path / "answers.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "tools/vqa.py"), "--ckpt", str(run), "--shards",
                           str(tmp_path / "data/val"), "--out", str(out), "--threads", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["questions"] == 8 and 0 <= summary["exact_match"] <= 100 and "em_左" in summary
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and all(r["question"].endswith("？") and r["references"] for r in rows)
    # a missing mode is a one-line usage error, exit 2
    proc = subprocess.run([sys.executable, str(REPO / "tools/vqa.py"), "--ckpt", str(run)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2


def test_vqa_breakdown_counts_by_kind_objects_and_where_errors() -> None:
    """benchmarks/vqa_breakdown.py: right / total per (kind, objects); a wrong "where" naming
    another object's cell (here the raster-first one) is counted as such."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vqa_breakdown", REPO / "benchmarks" / "vqa_breakdown.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    objs = [{"cell": [0, 0], "position": "左上"}, {"cell": [2, 2], "position": "右下"}]
    scenes = {"a.png": {"attrs": {"objects": objs}}, "b.png": {"attrs": {"objects": objs[:1]}}}
    questions = [{"image": "images/a.png", "qtype": "where", "answer": "右下"},
                 {"image": "images/a.png", "qtype": "count", "answer": "两个"},
                 {"image": "images/b.png", "qtype": "where", "answer": "左上"}]
    answers = [{"answer": "左上"}, {"answer": "两个"}, {"answer": "左上"}]
    out = mod.breakdown(answers, questions, scenes)
    assert out["by_kind_objects"] == {("where", 2): [0, 1], ("count", 2): [1, 1], ("where", 1): [1, 1]}
    assert out["by_objects"] == {2: [1, 2], 1: [1, 1]}
    assert out["where_wrong"] == {"wrong": 1, "names_another_object": 1, "names_raster_first": 1}
    with pytest.raises(ValueError, match="not the same run"):
        mod.breakdown(answers[:2], questions, scenes)
