"""build_archive: layout, rendered config, formats, idempotence and refusals."""

from __future__ import annotations

import tarfile
import zipfile

import pytest
import yaml

from llava_sessions.archive import build_archive
from llava_sessions.errors import ConfigError
from tests.fakes import write_echo_handler, write_fake_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    return write_fake_checkpoint(tmp_path / "ckpt")


@pytest.fixture
def handler_file(tmp_path):
    return write_echo_handler(tmp_path / "echo_handler.py")


def build(checkpoint, out, handler_file, **kwargs):
    kwargs.setdefault("max_sessions_per_worker", 4)
    kwargs.setdefault("session_ttl_s", 120)
    return build_archive(checkpoint, out, handler_file=handler_file, **kwargs)


def test_layout_and_config(tmp_path, checkpoint, handler_file):
    archive = build(checkpoint, tmp_path / "out", handler_file)
    names = sorted(p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file())
    assert names == [
        "MAR-INF/MANIFEST.json",
        "echo_handler.py",
        "model-config.yaml",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer_config.json",
    ]
    config = yaml.safe_load((archive / "model-config.yaml").read_text())
    assert config["minWorkers"] == config["maxWorkers"] == 1
    assert "sequenceBatching" not in config
    assert config["handler"] == {"session_ttl_s": 120, "max_sessions_per_worker": 4}


def test_rebuild_is_skipped_until_inputs_change(tmp_path, checkpoint, handler_file):
    first = build(checkpoint, tmp_path, handler_file)
    stamp = (first / "MAR-INF/MANIFEST.json").stat().st_mtime_ns
    assert build(checkpoint, tmp_path, handler_file) == first
    assert (first / "MAR-INF/MANIFEST.json").stat().st_mtime_ns == stamp
    build(checkpoint, tmp_path, handler_file, handler_overrides={"max_new_tokens_limit": 64,
                                                                 "default_max_new_tokens": 32})
    assert "max_new_tokens_limit: 64" in (first / "model-config.yaml").read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".build-")] == []


@pytest.mark.parametrize("fmt, name", [("default", "llava.mar"), ("tgz", "llava.tar.gz")])
def test_formats(tmp_path, checkpoint, handler_file, fmt, name):
    path = build(checkpoint, tmp_path / "out", handler_file, fmt=fmt)
    assert path.name == name
    if fmt == "default":
        members = zipfile.ZipFile(path).namelist()
    else:
        members = [m.split("/", 1)[1] for m in tarfile.open(path).getnames()]
    assert "model/model.safetensors" in members and "MAR-INF/MANIFEST.json" in members


def test_refuses_pickle_only_checkpoints(tmp_path, handler_file):
    ckpt = tmp_path / "pickled"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ConfigError, match="only pickle weights"):
        build(ckpt, tmp_path / "out", handler_file)


def test_rejects_unknown_handler_settings(tmp_path, checkpoint, handler_file):
    with pytest.raises(ConfigError, match="unknown handler settings"):
        build(checkpoint, tmp_path / "out", handler_file, handler_overrides={"max_sesions": 3})


def test_torchserve_hands_the_worker_one_request_at_a_time(tmp_path, checkpoint, handler_file):
    # The router batches (handler/bundle.py); TorchServe's batching would only add its delay.
    config = yaml.safe_load((build(checkpoint, tmp_path / "a", handler_file) / "model-config.yaml").read_text())
    assert config["batchSize"] == 1 and "maxBatchDelay" not in config
