"""The llava-sessions command: tiny-model and archive as a user runs them."""

from __future__ import annotations

import json

import yaml

from llava_sessions.cli import main


def test_tiny_model_then_archive(tmp_path, capsys):
    model = tmp_path / "tiny"
    assert main(["tiny-model", str(model)]) == 0
    assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
    assert not list(model.glob("*.bin"))
    assert "random-weight" in capsys.readouterr().out

    out = tmp_path / "store"
    assert main(["archive", "--model", str(model), "--out", str(out), "--sessions-per-worker", "5",
                 "--session-ttl", "300"]) == 0
    archive = out / "llava"
    assert f"archive: {archive}" in capsys.readouterr().out
    handler = yaml.safe_load((archive / "model-config.yaml").read_text())["handler"]
    assert handler == {"session_ttl_s": 300, "max_sessions_per_worker": 5}
    assert json.loads((archive / "model" / "config.json").read_text())["model_type"] == "llava"


def test_bad_arguments_say_how_to_fix_them(tmp_path, capsys):
    assert main(["archive", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
