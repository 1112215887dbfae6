"""tools/generate.py --prompts: prompt files, file names, per-prompt seeds, resume, rank split, the
two protocols that feed on it (FID-30k, human evaluation), and image completion."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gen_fixture import REPO, write_tiny_checkpoint
from ernie_vilg.generation.batch import (
    BatchSettings, Prompt, PromptFileError, generate_prompt_file, merge_samples, prompt_seed, read_prompts,
)

TEXTS = ["红色的圆", "蓝色的方", "大三角", "小的黄圆", "绿方在左", "一个红三角", "下面的蓝圆"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gen"))


@pytest.fixture(scope="module")
def bundle(ckpt):
    from ernie_vilg.pipeline import load_bundle

    return load_bundle(ckpt, need_image_tokenizer=True)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png")) if p.name != "grid.png"}


def _rows(folder: Path) -> list[dict]:
    return [json.loads(l) for l in (folder / "samples.jsonl").read_text(encoding="utf-8").splitlines()]


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(f"p{i:03d}", TEXTS[i % len(TEXTS)] + "的" * (i % 3)) for i in range(n)]


# ------------------------------------------------------------------------------ prompt files
def test_txt_and_jsonl_prompt_files(tmp_path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("红色的圆\n\n  蓝色的方  \n", encoding="utf-8")
    assert read_prompts(txt) == [Prompt("00000", "红色的圆"), Prompt("00001", "蓝色的方")]
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"id": 391895, "text": "红圆", "file_name": "x.jpg"}\n{"text": "蓝方"}\n', encoding="utf-8")
    assert read_prompts(jl) == [Prompt("391895", "红圆"), Prompt("1", "蓝方")]


@pytest.mark.parametrize("content, suffix, match", [
    ("", ".txt", "no prompts"),
    ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', ".jsonl", "appears twice"),
    ('{"id": "../x", "text": "x"}\n', ".jsonl", "cannot be a file name"),
    ('{"id": "a"}\n', ".jsonl", ":1: needs a non-empty string 'text'"),
    ("{oops\n", ".jsonl", ":1: not JSON"),
    ("x", ".csv", ".txt .one a line. or .jsonl"),
])
def test_bad_prompt_files_name_the_problem(tmp_path, content, suffix, match) -> None:
    path = tmp_path / f"p{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptFileError, match=match):
        read_prompts(path)


def test_prompt_seed_depends_on_seed_and_id_only() -> None:
    assert prompt_seed(0, "a") == prompt_seed(0, "a")
    assert len({prompt_seed(0, "a"), prompt_seed(1, "a"), prompt_seed(0, "b")}) == 3


# ------------------------------------------------------------------------------ batch generation
def test_names_sidecars_samples_and_batch_size_independence(bundle, tmp_path) -> None:
    prompts = _prompts(5)
    a, b = tmp_path / "a", tmp_path / "b"
    counts = generate_prompt_file(bundle, prompts, a, BatchSettings(batch_size=2, num_candidates=2, progress=False))
    assert counts == {"generated": 5, "skipped": 0, "images": 10}
    generate_prompt_file(bundle, prompts, b, BatchSettings(batch_size=5, num_candidates=2, progress=False))
    pa, pb = _pixels(a), _pixels(b)
    assert sorted(pa) == sorted(f"{p.id}_{k}.png" for p in prompts for k in range(2))
    for name in pa:  # another batching, the same images
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
    assert not np.array_equal(pa["p000_0.png"], pa["p000_1.png"])  # candidates differ
    for p in prompts:
        assert (a / f"{p.id}.txt").read_text(encoding="utf-8").strip() == p.text
    rows = _rows(a)
    assert [(r["id"], r["candidate"]) for r in rows] == [(p.id, k) for p in prompts for k in range(2)]
    assert all(r["seed"] == prompt_seed(0, r["id"]) and r["prompt"] == r["text"] and r["rank"] is None
               for r in rows)
    assert not list(a.glob(".*.tmp-*"))


def test_best_of_n_keeps_the_ranked_best_and_records_scores(bundle, tmp_path) -> None:
    prompts = _prompts(2)
    out = tmp_path / "keep"
    generate_prompt_file(bundle, prompts, out, BatchSettings(num_candidates=3, keep=1, progress=False))
    assert sorted(_pixels(out)) == ["p000.png", "p001.png"]
    all3 = tmp_path / "all"
    generate_prompt_file(bundle, prompts, all3, BatchSettings(num_candidates=3, progress=False))
    for row in _rows(out):
        assert row["rank"] == 0 and set(row["scores"]) == {"likelihood"}
        # the kept image is the candidate the row names, and the best by likelihood
        np.testing.assert_array_equal(_pixels(out)[row["image"]], _pixels(all3)[f"{row['id']}_{row['candidate']}.png"])


def test_resume_skips_finished_ids_and_redoes_a_half_written_one(bundle, tmp_path) -> None:
    prompts = _prompts(4)
    out = tmp_path / "r"
    generate_prompt_file(bundle, prompts[:2], out, BatchSettings(batch_size=2, progress=False))
    first = _pixels(out)
    stamp = (out / "p000.png").stat().st_mtime_ns
    # a kill after p001's image but before its sidecar, with a temporary file left behind
    (out / "p001.txt").unlink()
    (out / ".p002.png.tmp-99999").write_bytes(b"partial")
    counts = generate_prompt_file(bundle, prompts, out, BatchSettings(batch_size=2, progress=False))
    assert counts["skipped"] == 1 and counts["generated"] == 3
    assert (out / "p000.png").stat().st_mtime_ns == stamp  # not rewritten
    np.testing.assert_array_equal(_pixels(out)["p001.png"], first["p001.png"])  # redone identically
    assert [r["id"] for r in _rows(out)] == [p.id for p in prompts]  # one row each, file order
    assert not (out / ".p002.png.tmp-99999").exists()  # a dead writer's temporary is removed
    # another prompt under an id already used is not "finished"
    changed = [Prompt("p000", "绿色的圆")] + prompts[1:]
    assert generate_prompt_file(bundle, changed, out, BatchSettings(progress=False))["generated"] == 1
    assert _rows(out)[0]["prompt"] == "绿色的圆"


def test_rank_shares_cover_every_prompt_once_and_merge_into_one_file(bundle, tmp_path) -> None:
    prompts = _prompts(7)
    out = tmp_path / "ranks"
    for rank in (1, 0, 2):
        generate_prompt_file(bundle, prompts, out, BatchSettings(batch_size=2, progress=False), rank=rank, world=3)
    assert [r["id"] for r in _rows(out)] == [p.id for p in prompts]
    one = tmp_path / "one"
    generate_prompt_file(bundle, prompts, one, BatchSettings(batch_size=3, progress=False))
    for name, px in _pixels(one).items():
        np.testing.assert_array_equal(_pixels(out)[name], px, err_msg=name)
    assert merge_samples(out, prompts) == 7


def test_cli_text_prompts_overrides_and_one_line_errors(ckpt, tmp_path) -> None:
    out = tmp_path / "cli"
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "tools/generate.py"), "--ckpt", str(ckpt), *a],  # noqa: E731
                                    capture_output=True, text=True, env=_env(), timeout=120)
    ok = run("--text", "红色的圆", "--text", "蓝色的方", "--out", str(out), "--top-k", "1", "--no-progress")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert sorted(_pixels(out)) == ["00000.png", "00001.png"] and (out / "grid.png").is_file()
    # top-k 1 is greedy: any seed gives the same image
    again = run("--text", "红色的圆", "--out", str(tmp_path / "g2"), "--top-k", "1", "--seed", "5", "--no-progress")
    assert again.returncode == 0
    np.testing.assert_array_equal(_pixels(out)["00000.png"], _pixels(tmp_path / "g2")["00000.png"])
    for bad, msg in ((["--prompts", str(tmp_path / "none.txt")], "prompt file not found"),
                     (["--text", "x", "--top-p", "0"], "--top-p must be in (0, 1]"),
                     (["--text", "x", "--num-candidates", "0"], "--num-candidates must be >= 1"),
                     (["--text", "x", "--init-image", str(tmp_path / "none.png")], "go together")):
        res = run(*bad, "--out", str(tmp_path / "bad"))
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and msg in res.stderr, res.stderr


# ------------------------------------------------------------------------------ 2 processes
def _launch_generate(ckpt: Path, prompts: Path, out: Path, nproc: int) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(nproc), "--master",
           f"127.0.0.1:{port}", "--log_dir", str(out.parent / f"{out.name}-logs"), str(REPO / "tools/generate.py"),
           "--ckpt", str(ckpt), "--prompts", str(prompts), "--out", str(out), "--batch-size", "8", "--no-progress",
           "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode:
        logs = "\n".join(f.read_text()[-2000:] for f in sorted((out.parent / f"{out.name}-logs").glob("workerlog.*")))
        pytest.fail(f"{proc.stderr[-2000:]}\n{logs}")


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_give_the_same_40_images_as_one(ckpt, tmp_path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": p.id, "text": p.text}, ensure_ascii=False) + "\n"
                               for p in _prompts(40)), encoding="utf-8")
    two, one = tmp_path / "two", tmp_path / "one"
    _launch_generate(ckpt, prompts, two, 2)
    proc = subprocess.run([sys.executable, str(REPO / "tools/generate.py"), "--ckpt", str(ckpt), "--prompts",
                           str(prompts), "--out", str(one), "--batch-size", "5", "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    p1, p2 = _pixels(one), _pixels(two)
    assert len(p1) == 40 and sorted(p1) == sorted(p2)
    for name in p1:
        np.testing.assert_array_equal(p1[name], p2[name], err_msg=name)
    assert _rows(one) == _rows(two)  # one merged samples.jsonl, in prompt-file order
    assert {f.name for f in (two / ".parts").glob("rank-*.jsonl")} == {"rank-0.jsonl", "rank-1.jsonl"}


# ------------------------------------------------------------------------------ the protocols
def test_fid_protocol_sample_captions_then_generate_then_fid(bundle, tmp_path) -> None:
    import paddle

    from ernie_vilg.metrics.inception import InceptionV3FID
    from ernie_vilg.generation.batch import read_prompts
    from ernie_vilg.metrics.fid import WEIGHTS_FILE, evaluate_fid, write_caption_sample

    coco = REPO / "tests/fixtures/datasets/coco/captions_val2014.json"
    prompts_file = tmp_path / "prompts.jsonl"
    assert write_caption_sample(coco, prompts_file, num=3, seed=0) == 3
    prompts = read_prompts(prompts_file)
    for seed in (0, 1):
        generate_prompt_file(bundle, prompts, tmp_path / f"gen{seed}",
                             BatchSettings(num_candidates=2, keep=1, seed=seed, progress=False))
    assert sorted(_pixels(tmp_path / "gen0")) == sorted(f"{p.id}.png" for p in prompts)  # one image per prompt
    paddle.seed(0)  # FID with a random-weight Inception: the chain, not the number, is under test
    weights = tmp_path / "w"
    weights.mkdir()
    paddle.save(InceptionV3FID().state_dict(), str(weights / WEIGHTS_FILE))
    res = evaluate_fid(tmp_path / "gen0", tmp_path / "gen1", weights, batch_size=3, progress=False)
    assert res["count_a"] == res["count_b"] == 3 and np.isfinite(res["FID"]) and res["FID"] > 0


def test_human_eval_protocol_prompts_then_generate_then_sheet(bundle, tmp_path) -> None:
    from ernie_vilg.metrics.human_eval import build_sheet, items_from_folders, items_from_jsonl, load_prompt_suite, prompt_rows

    rows = prompt_rows(load_prompt_suite(REPO / "configs/human_eval/prompts.yaml"))[:4]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "ours"
    generate_prompt_file(bundle, read_prompts(prompts_file), out, BatchSettings(progress=False))
    items = items_from_jsonl(out / "samples.jsonl")  # the samples file is a rating list as it is
    assert [(i.source_id, i.text) for i in items] == [(r["id"], r["text"]) for r in rows]
    by_folder = items_from_folders([out])  # ... and so is the folder, through the sidecars
    assert sorted(i.text for i in by_folder) == sorted(r["text"] for r in rows)
    key = build_sheet(items, "image", tmp_path / "sheet.html", seed=0)
    page = (tmp_path / "sheet.html").read_text(encoding="utf-8")
    assert Path(key).is_file() and all(r["text"] in page for r in rows)


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_images(ckpt, bundle, tmp_path) -> None:
    """SIGKILL mid-run: no partial PNG under a final name, and the rerun finishes the rest with the
    images an uninterrupted run makes."""
    import signal
    import time

    prompts = _prompts(24)
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("".join(json.dumps({"id": p.id, "text": p.text}, ensure_ascii=False) + "\n" for p in prompts),
                     encoding="utf-8")
    out = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "tools/generate.py"), "--ckpt", str(ckpt), "--prompts", str(pfile), "--out",
           str(out), "--batch-size", "1", "--no-progress", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while len(list(out.glob("*.txt"))) < 3:
            assert proc.poll() is None and time.time() < deadline, "generate ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(list(out.glob("*.txt")))
    assert done < len(prompts)  # really interrupted
    for png in out.glob("*.png"):  # whatever has a final name is a whole image
        Image.open(png).load()
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{done} already done" in res.stdout
    clean = tmp_path / "clean"
    generate_prompt_file(bundle, prompts, clean, BatchSettings(batch_size=4, progress=False))
    assert sorted(_pixels(out)) == sorted(_pixels(clean))
    for name, px in _pixels(clean).items():
        np.testing.assert_array_equal(_pixels(out)[name], px, err_msg=name)
    assert [r["id"] for r in _rows(out)] == [p.id for p in prompts]
