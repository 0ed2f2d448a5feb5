"""The llava-sessions command: tiny-model and archive as a user runs them."""

from __future__ import annotations

import json

import pytest
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


def test_the_request_size_limit_must_be_sane(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLAVA_SESSIONS_MAX_REQUEST_BYTES", "lots")
    assert main(["serve", "--archive", str(tmp_path)]) == 2
    assert "LLAVA_SESSIONS_MAX_REQUEST_BYTES='lots'" in capsys.readouterr().err
    assert main(["serve", "--archive", str(tmp_path), "--max-request-bytes", "10"]) == 2
    assert "at least 1024" in capsys.readouterr().err


def test_torchserve_gets_the_same_request_size_limit_as_the_router(tmp_path):
    from llava_sessions.torchserve_process import TorchServeProcess

    process = TorchServeProcess(tmp_path / "archive", tmp_path / "run", max_request_bytes=3 << 20)
    process.run_dir.mkdir(parents=True)
    process._write_config()
    lines = (process.run_dir / "config.properties").read_text().splitlines()
    assert f"max_request_size={3 << 20}" in lines


def test_version_and_help_with_defaults(capsys):
    from llava_sessions import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"llava-sessions {__version__}"
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8080)" in text and "(default: 32)" in text  # --port, --max-sessions-per-worker
    assert "formerly" not in text or "--sessions-per-worker" in text
    with pytest.raises(SystemExit):
        main(["archive", "--help"])
    assert "no-archive: a folder TorchServe loads in place" in " ".join(capsys.readouterr().out.split())
