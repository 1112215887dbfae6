"""Out-of-range config values stop at load time with one line naming the key, the value and the
allowed range (issue 21): each section has a validator in ernie_vilg/config.py. Also the YAML
limits: a `_base_` that is not a path, an alias bomb, a huge value quoted in an error."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ernie_vilg.config import (
    ATTENTION_IMPLS, DECODE_STRATEGIES, MAX_QUOTED, ConfigError, load_config, load_saved_config, short_repr,
)

REPO = Path(__file__).resolve().parents[1]
TINY_VILG = REPO / "configs" / "vilg" / "tiny.yaml"
TINY_VQ = REPO / "configs" / "vq" / "tiny_vqvae.yaml"

# (override, the words the message must contain): every case the reliability probe found, and neighbours
OUT_OF_RANGE = [
    ("Data.batch_size=0", "Data.batch_size = 0: must be an integer >= 1"),
    ("Data.batch_size=-4", "Data.batch_size = -4: must be an integer >= 1"),
    ("Train.log_every=0", "Train.log_every = 0: must be an integer >= 1"),
    ("Data.image_size=0", "Data.image_size = 0: must be an integer >= 1"),
    ("Train.eval_samples=0", "Train.eval_samples = 0: must be an integer >= 1"),
    ("Optimizer.beta1=1.5", "Optimizer.beta1 = 1.5: must be a finite number in [0, 1)"),
    ("Model.num_layers=0", "Model.num_layers = 0: must be an integer >= 1"),
    ("Model.num_heads=0", "Model.num_heads = 0: must be an integer >= 1"),
    ("Model.conv_kernel=4", "Model.conv_kernel = 4: must be an odd integer >= 1"),
    ("Model.max_text_len=1", "Model.max_text_len = 1: must be an integer >= 3"),
    ("Data.max_text_len=1", "Data.max_text_len = 1: must be an integer >= 3"),
    ("Model.attention_impl=flash", "Model.attention_impl = 'flash': must be one of dense, sparse_reference"),
    ("Model.dropout=1.5", "Model.dropout = 1.5: must be a finite number in [0, 1)"),
    ("Model.hidden_size=33", "Model.hidden_size = 33: must be divisible by Model.num_heads (2)"),
    ("Optimizer.lr=-1", "Optimizer.lr = -1.0: must be a finite number in (0, inf)"),
    ("Optimizer.lr=0", "Optimizer.lr = 0.0: must be a finite number in (0, inf)"),
    ("Global.device=tpu", "Global.device = 'tpu': must be one of cpu, gpu"),
    ("Optimizer.schedule=linear", "Optimizer.schedule = 'linear': must be one of constant, cosine"),
    ("Generation.top_p=0", "Generation.top_p = 0.0: must be a finite number in (0, 1]"),
    ("Generation.num_candidates=0", "Generation.num_candidates = 0: must be an integer >= 1"),
    ("Generation.decode_strategy=nucleus", "Generation.decode_strategy = 'nucleus': must be one of greedy"),
    ("Train.cond_drop=1.5", "Train.cond_drop = 1.5: must be a finite number in [0, 1]"),
]


@pytest.mark.parametrize("override, words", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_out_of_range_value_is_a_config_error_naming_key_value_and_range(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_VILG, [override])
    message = str(info.value)
    assert words in message and f"-o {override}" in message and "\n" not in message


def test_image_size_not_divisible_by_the_tokenizer_factor():
    with pytest.raises(ConfigError, match=r"Data.image_size = 7: must be a multiple of VQ.downsample_factor \(4\)"):
        load_config(TINY_VQ, ["Data.image_size=7"])


def test_non_finite_learning_rate_from_yaml_names_the_file(tmp_path):
    path = tmp_path / "inf_lr.yaml"
    path.write_text(f"_base_: {TINY_VILG}\nOptimizer:\n  lr: 1.0e+999\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"inf_lr\.yaml: Optimizer.lr = inf: must be a finite number"):
        load_config(path)


@pytest.mark.parametrize("base", ["5", "[null]", "['']", "{a: 1}"])
def test_bad_base_value_is_a_config_error(tmp_path, base):
    path = tmp_path / "bad_base.yaml"
    path.write_text(f"_base_: {base}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad_base\.yaml: _base_ = .*: must be a file path or a list"):
        load_config(path)


def test_every_shipped_config_passes_the_range_checks():
    configs = [p for p in (REPO / "configs").rglob("*.yaml") if "human_eval" not in p.parts]
    assert len(configs) > 10
    for path in configs:
        load_config(path)


def test_name_lists_have_one_definition_that_the_upper_floors_read():
    # config.py (floor 0) defines the lists; the modules that act on them import them
    from ernie_vilg.generation import captions
    from ernie_vilg.models import sparse_masks

    assert sparse_masks.ATTENTION_IMPLS is ATTENTION_IMPLS and captions.DECODE_STRATEGIES is DECODE_STRATEGIES


ALIAS_BOMB = "\n".join(
    ["Data:", '  vocab_file: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"  x{i}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
       f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]" for i in range(8)]) + "\n"


def test_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB, encoding="utf-8")
    assert path.stat().st_size < 1000
    t0 = time.time()
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert time.time() - t0 < 5
    assert "alias" in str(info.value) and len(str(info.value)) < 400


def test_a_checkpoint_config_yaml_is_read_with_the_same_limits(tmp_path):
    (tmp_path / "config.yaml").write_text(ALIAS_BOMB, encoding="utf-8")
    with pytest.raises(ConfigError, match="alias"):
        load_saved_config(tmp_path / "config.yaml")


def test_a_huge_value_in_an_error_message_is_cut_short(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("Data:\n  batch_size: [" + ", ".join(["1"] * 5000) + "]\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(str(info.value)) < len(str(path)) + 200
    assert len(short_repr("x" * 10_000)) <= MAX_QUOTED


def test_config_error_from_the_train_tool_is_one_line_before_any_io(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, str(REPO / "tools/train.py"), "-c", str(TINY_VILG),
                           "-o", f"Global.output_dir={out}", "-o", "Optimizer.lr=1e999"],
                          capture_output=True, text=True, timeout=120, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: -o Optimizer.lr=1e999: Optimizer.lr = inf: must be a finite number in (0, inf)"]
    assert not out.exists()  # nothing written before the check
