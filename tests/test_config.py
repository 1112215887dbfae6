import subprocess
import sys
from pathlib import Path

import pytest

from ernie_vilg.config import ConfigError, load_config, load_saved_config, save_config


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    cfg = write(tmp_path, "a.yaml", "Train:\n  max_step: 10\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert "Train.max_step" in str(exc.value) and str(cfg) in str(exc.value)


def test_unknown_section(tmp_path):
    cfg = write(tmp_path, "a.yaml", "Trian:\n  max_steps: 10\n")
    with pytest.raises(ConfigError, match="unknown section 'Trian'"):
        load_config(cfg)


def test_wrong_type_names_key_and_file(tmp_path):
    cfg = write(tmp_path, "a.yaml", "Train:\n  max_steps: ten\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert "Train.max_steps" in str(exc.value) and "expected int" in str(exc.value)
    assert str(cfg) in str(exc.value)


def test_bool_is_not_int_and_int_widens_to_float(tmp_path):
    with pytest.raises(ConfigError, match="expected int"):
        load_config(write(tmp_path, "a.yaml", "Train:\n  max_steps: true\n"))
    cfg = load_config(write(tmp_path, "b.yaml", "Optimizer:\n  lr: 1\n"))
    assert isinstance(cfg.Optimizer.lr, float) and cfg.Optimizer.lr == 1.0


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "Train:\n  max_steps: 10\n  log_every: 3\nVQ:\n  codebook_size: 64\n")
    child = write(tmp_path, "child.yaml", "_base_: base.yaml\nTrain:\n  max_steps: 20\n")
    cfg = load_config(child, ["VQ.channel_mult=[1, 2]", "Global.output_dir=/tmp/x", "Train.resume=false"])
    assert cfg.Train.max_steps == 20 and cfg.Train.log_every == 3
    assert cfg.VQ.codebook_size == 64 and cfg.VQ.channel_mult == [1, 2]
    assert cfg.Global.output_dir == "/tmp/x" and cfg.Train.resume is False


def test_override_wrong_type_names_the_override():
    with pytest.raises(ConfigError, match="Train.max_steps"):
        load_config(None, ["Train.max_steps=1.5"])
    with pytest.raises(ConfigError, match="Section.key=value"):
        load_config(None, ["max_steps=3"])


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config(None, ["VQ.codebook_size=128", "Global.stage=vilg"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_saved_config(tmp_path / "config.yaml")
    assert again == cfg


def test_tool_exits_2_with_one_line(tmp_path, repo_root):
    cfg = write(tmp_path, "a.yaml", "Train:\n  bogus: 1\n")
    proc = subprocess.run([sys.executable, str(repo_root / "tools/train.py"), "-c", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "Train.bogus" in lines[0] and str(cfg) in lines[0]
