"""The paper's data filter (sec. 3.2.1): every rule, positive and negative, exact reasons."""
import json

import pytest

from ernie_vilg.data.filter import (
    count_words, filter_manifest, first_special_char, has_noun, similarity_reject_reason,
    text_reject_reason,
)


# ---------------------------------------------------------------- rule 1: fewer than 15 words

def test_punctuation_and_spaces_are_not_words():
    assert count_words("一只猫。") == 2  # 一只 / 猫; the full stop is not a word
    assert count_words("A cat , 猫！") == 3  # A / cat / 猫; spaces, comma and ！ are not words


def test_fourteen_words_pass_fifteen_fail():
    assert count_words("，".join(["猫"] * 14)) == 14
    assert text_reject_reason("，".join(["猫"] * 14)) is None
    assert text_reject_reason("，".join(["猫"] * 15)) == "too_many_words(15>=15)"


def test_long_chinese_sentence_rejected_with_its_count():
    text = "我们今天在公园里看到了一只非常可爱的小狗它正在和一个穿着红色衣服的小女孩玩耍"
    assert text_reject_reason(text) == f"too_many_words({count_words(text)}>=15)"
    assert count_words(text) >= 15


def test_mixed_chinese_english_word_count():
    text = "一个男人在 street 上骑 bicycle"
    assert count_words(text) == 7  # 一个 男人 在 street 上 骑 bicycle
    assert text_reject_reason(text) is None
    long_mixed = "猫 " + " ".join(["cat"] * 14)
    assert text_reject_reason(long_mixed) == "too_many_words(15>=15)"


def test_max_words_is_configurable():
    assert text_reject_reason("一只猫坐在桌子上", max_words=3) == "too_many_words(5>=3)"


# ---------------------------------------------------------------- rule 2: at least one noun

@pytest.mark.parametrize("text", ["一只猫坐在桌子上。", "北京的天安门", "红色的圆形", "一个男人在 street 上骑 bicycle"])
def test_texts_with_a_noun_pass(text):
    assert has_noun(text)
    assert text_reject_reason(text) is None


@pytest.mark.parametrize("text", ["他很高兴地跑了", "非常好", "A cat sitting on the table"])
def test_texts_without_a_noun_fail(text):
    # jieba tags English words "eng": an all-English text has no noun under this rule
    assert not has_noun(text)
    assert text_reject_reason(text) == "no_noun"


# ---------------------------------------------------------------- rule 3: no special characters

@pytest.mark.parametrize("text", [
    "一只猫坐在桌子上。", "猫，狗、鸟！真的？是：的；“好”‘吗’（对）《书》……——·", "猫 100% a/b-c (ok), yes! 'x' \"y\": z; w?",
    "猫\u3000狗",
])
def test_allowed_characters_pass(text):
    assert first_special_char(text) is None


@pytest.mark.parametrize("text,code", [
    ("一只可爱的小猫😀在草地上", "U+1F600"),
    ("#猫 在桌子上", "U+0023"),
    ("猫@狗", "U+0040"),
    ("猫的价格¥100", "U+00A5"),
    ("猫&狗", "U+0026"),
    ("猫|狗", "U+007C"),
    ("猫<狗>", "U+003C"),
    ("猫{狗}", "U+007B"),
    ("猫[狗]", "U+005B"),
    ("猫\\狗", "U+005C"),
    ("草地上有一只黑色的狗\t", "U+0009"),
    ("【包邮】连衣裙", "U+3010"),
    ("猫\ue000狗", "U+E000"),
    ("ＡＢＣ的猫", "U+FF21"),
    ("café的猫", "U+00E9"),
])
def test_special_characters_fail_with_their_code_point(text, code):
    assert text_reject_reason(text) == f"special_char({code})"


def test_rules_are_checked_in_order():
    # too many words wins over a special character, no noun wins over a special character
    assert text_reject_reason("#" + "，".join(["猫"] * 15)).startswith("too_many_words(")
    assert text_reject_reason("非常好😀") == "no_noun"


# ---------------------------------------------------------------- rule 4: similarity

def test_similarity_threshold_is_strict_and_reason_is_floored():
    assert similarity_reject_reason(0.51) is None
    assert similarity_reject_reason(0.5) == "low_similarity(0.50<=0.5)"
    assert similarity_reject_reason(0.31) == "low_similarity(0.31<=0.5)"
    assert similarity_reject_reason(0.4999) == "low_similarity(0.49<=0.5)"  # never prints 0.50
    assert similarity_reject_reason(0.7, threshold=0.75) == "low_similarity(0.70<=0.75)"


# ---------------------------------------------------------------- streaming over a manifest

def _write(path, lines):
    with open(path, "wb") as fh:
        for line in lines:
            fh.write((line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode()) + b"\n")


def test_filter_manifest_writes_kept_rejected_and_exact_reasons(tmp_path):
    src = tmp_path / "in" / "m.jsonl"
    src.parent.mkdir()
    _write(src, [
        {"image": "a.png", "text": "一只猫坐在桌子上。", "id": 1},
        {"image": "b.png", "text": "他很高兴地跑了", "id": 2},
        b"{not json",
        b"",
        {"image": "c.png", "text": "#猫 在桌子上", "id": 3},
        {"image": "d.png", "text": "，".join(["猫"] * 17), "id": 4},
        b"[1, 2]",
        {"image": "e.png", "text": "  ", "id": 5},
        b"\xff\xfe",
        {"image": "f.png", "text": "红色的圆形", "id": 6},
        {"image": "g.png", "text": "蓝色的方块", "id": 7},
    ])
    scores = {"f.png": 0.31, "a.png": 0.9, "g.png": 0.6}

    def scorer(paths, texts):
        return [scores[p.rsplit("/", 1)[-1]] for p in paths]

    kept, rej = tmp_path / "out" / "kept.jsonl", tmp_path / "out" / "rejected.jsonl"
    summary = filter_manifest(src, kept, rej, scorer=scorer, chunk_size=3)
    kept_lines = [json.loads(l) for l in kept.read_text(encoding="utf-8").splitlines()]
    rej_lines = [json.loads(l) for l in rej.read_text(encoding="utf-8").splitlines()]
    assert [k["id"] for k in kept_lines] == [1, 7]
    assert kept_lines[0]["image"] == "../in/a.png"  # still resolves from the output folder
    reasons = [r["reject_reason"] for r in rej_lines]
    assert reasons == [
        "no_noun", "bad_line(not JSON)", "special_char(U+0023)", "too_many_words(17>=15)",
        "bad_line(not a JSON object)", "bad_line(no text)", "bad_line(not UTF-8)",
        "low_similarity(0.31<=0.5)",
    ]
    assert rej_lines[1] == {"line": "{not json", "line_no": 3, "reject_reason": "bad_line(not JSON)"}
    assert rej_lines[0]["id"] == 2 and rej_lines[0]["image"] == "../in/b.png"
    assert summary.read == 10 and summary.kept == 2 and summary.rejected == 8
    assert summary.reasons == {"no_noun": 1, "bad_line": 4, "special_char": 1, "too_many_words": 1,
                               "low_similarity": 1}
    table = summary.table()
    assert "bad_line" in table and "total" in table and "kept" in table


def test_without_reranker_similarity_is_not_checked_and_bad_images_are_named(tmp_path):
    src = tmp_path / "m.jsonl"
    _write(src, [{"image": "a.png", "text": "红色的圆形"}, {"image": "b.png", "text": "蓝色的圆形"}])
    kept, rej = tmp_path / "k.jsonl", tmp_path / "r.jsonl"
    assert filter_manifest(src, kept, rej).kept == 2
    assert json.loads(kept.read_text(encoding="utf-8").splitlines()[0])["image"] == "a.png"

    def scorer(paths, texts):
        return [ValueError("cannot decode"), 0.8]

    summary = filter_manifest(src, kept, rej, scorer=scorer)
    assert summary.kept == 1
    assert json.loads(rej.read_text(encoding="utf-8"))["reject_reason"] == "bad_image(ValueError)"


def test_filter_tool_prints_summary(tmp_path, repo_root):
    import subprocess
    import sys

    src = tmp_path / "m.jsonl"
    _write(src, [{"image": "a.png", "text": "红色的圆形"}, {"image": "b.png", "text": "非常好"}])
    res = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "filter_data.py"), "--manifest", str(src),
         "--kept", str(tmp_path / "k.jsonl"), "--rejected", str(tmp_path / "r.jsonl"), "--no-progress"],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"read": 2, "kept": 1, "rejected": 1, "reasons": {"no_noun": 1}}
    assert "no_noun" in res.stderr
