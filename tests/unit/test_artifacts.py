"""llava-sessions upload against moto's S3: layout, checksums, skipping, multipart, tar.gz, the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile

import pytest
from llava_sessions.deploy import artifacts
from llava_sessions.deploy.progress import ByteProgress, StatusTicker

from llava_sessions.cli import main
from llava_sessions.errors import ConfigError
from tests.fakes import isolate_from_aws, write_fake_checkpoint

BUCKET = "model-bucket"
MIB = 1 << 20


@pytest.fixture
def s3(monkeypatch):
    from moto import mock_aws

    isolate_from_aws(monkeypatch)
    with mock_aws():
        import boto3

        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture
def archive(tmp_path):
    """A folder shaped like a built archive, with a weights file big enough for a multipart upload."""
    root = tmp_path / "store" / "llava"
    (root / "MAR-INF").mkdir(parents=True)
    (root / "model").mkdir()
    (root / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"model": {"modelName": "llava"}}))
    (root / "model-config.yaml").write_text("minWorkers: 1\n")
    (root / "torchserve_handler.py").write_text("# handler\n")
    (root / "model" / "config.json").write_text("{}")
    (root / "model" / "model.safetensors").write_bytes(os.urandom(11 * MIB))
    return root


def small_parts():
    return artifacts.transfer_config(part_size=5 * MIB, concurrency=2)


def keys(s3, prefix=""):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_lands_under_the_prefix_with_digests_and_checksums(s3, archive, capsys):
    result = artifacts.upload_directory(s3, archive, BUCKET, "models/llava", config=small_parts())
    assert result.uri == "s3://model-bucket/models/llava/"
    assert keys(s3) == [
        "models/llava/MAR-INF/MANIFEST.json",
        "models/llava/model-config.yaml",
        "models/llava/model/config.json",
        "models/llava/model/model.safetensors",
        "models/llava/torchserve_handler.py",
    ]
    assert result.bytes_uploaded == sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
    head = s3.head_object(Bucket=BUCKET, Key="models/llava/model-config.yaml", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == sha(archive / "model-config.yaml")
    assert head["ChecksumSHA256"]  # S3 checked the SHA-256 on arrival
    # The weights went up in three 5 MiB parts, still carrying the whole file's digest.
    weights = s3.head_object(Bucket=BUCKET, Key="models/llava/model/model.safetensors")
    assert weights["ETag"].strip('"').endswith("-3")
    assert weights["Metadata"]["sha256"] == sha(archive / "model" / "model.safetensors")
    listed = s3.list_objects_v2(Bucket=BUCKET)["Contents"]
    assert all(o.get("ChecksumAlgorithm") == ["SHA256"] for o in listed)
    assert result.model_data_source == {"S3DataSource": {
        "S3Uri": "s3://model-bucket/models/llava/", "S3DataType": "S3Prefix", "CompressionType": "None"}}


def test_second_run_uploads_nothing_and_a_change_goes_up_alone(s3, archive):
    artifacts.upload_directory(s3, archive, BUCKET, "p/", config=small_parts())
    again = artifacts.upload_directory(s3, archive, BUCKET, "p/", config=small_parts())
    assert again.uploaded == [] and len(again.skipped) == 5 and again.bytes_uploaded == 0

    (archive / "model-config.yaml").write_text("minWorkers: 2\n")  # same size, new content
    changed = artifacts.upload_directory(s3, archive, BUCKET, "p/", config=small_parts())
    assert changed.uploaded == ["p/model-config.yaml"]
    body = s3.get_object(Bucket=BUCKET, Key="p/model-config.yaml")["Body"].read()
    assert body == b"minWorkers: 2\n"


def test_nothing_is_deleted_unless_asked(s3, archive):
    artifacts.upload_directory(s3, archive, BUCKET, "p", config=small_parts())
    (archive / "torchserve_handler.py").unlink()
    kept = artifacts.upload_directory(s3, archive, BUCKET, "p", config=small_parts())
    assert "p/torchserve_handler.py" in keys(s3) and kept.deleted == []
    pruned = artifacts.upload_directory(s3, archive, BUCKET, "p", delete=True, config=small_parts())
    assert pruned.deleted == ["p/torchserve_handler.py"] and pruned.uploaded == []
    assert "p/torchserve_handler.py" not in keys(s3)
    with pytest.raises(ConfigError, match="whole bucket"):
        artifacts.upload_directory(s3, archive, BUCKET, "/", delete=True)


def test_digest_cache_avoids_rehashing(tmp_path, archive, monkeypatch):
    cache_path = tmp_path / "digests.json"
    first = artifacts.DigestCache(cache_path).digests(list(archive.rglob("*.json")))
    monkeypatch.setattr(artifacts, "sha256_file", lambda *a, **k: pytest.fail("re-hashed"))
    assert artifacts.DigestCache(cache_path).digests(list(archive.rglob("*.json"))) == first


def test_tarball_is_reproducible_with_files_at_its_root(tmp_path, archive):
    one = artifacts.write_tarball(archive, tmp_path / "a" / "model.tar.gz")
    two = artifacts.write_tarball(archive, tmp_path / "b" / "model.tar.gz")
    assert one.read_bytes() == two.read_bytes()
    with tarfile.open(one) as tar:
        assert sorted(tar.getnames()) == [
            "MAR-INF/MANIFEST.json", "model-config.yaml", "model/config.json",
            "model/model.safetensors", "torchserve_handler.py",
        ]
        assert tar.extractfile("model-config.yaml").read() == b"minWorkers: 1\n"
    stamp = one.stat().st_mtime_ns
    assert artifacts.write_tarball(archive, one) == one and one.stat().st_mtime_ns == stamp  # reused


def test_tarball_upload_is_skipped_when_unchanged(s3, tmp_path, archive):
    tarball = artifacts.write_tarball(archive, tmp_path / "model.tar.gz")
    first = artifacts.upload_file(s3, tarball, BUCKET, "tgz/model.tar.gz", config=small_parts())
    assert first.uploaded == ["tgz/model.tar.gz"] and first.uri == "s3://model-bucket/tgz/model.tar.gz"
    assert first.model_data_source["S3DataSource"]["CompressionType"] == "Gzip"
    assert artifacts.upload_file(s3, tarball, BUCKET, "tgz/model.tar.gz").skipped == ["tgz/model.tar.gz"]


@pytest.mark.parametrize("uri, message", [
    ("bucket/prefix", "s3://"), ("s3:///prefix", "no bucket"), ("s3://b/prefix", "end with '/'"),
])
def test_bad_locations_say_what_to_do(uri, message):
    with pytest.raises(ConfigError, match=message):
        artifacts.model_data_source(uri)


def test_missing_bucket_is_a_config_error(s3, archive):
    with pytest.raises(ConfigError, match="does not exist"):
        artifacts.upload_directory(s3, archive, "no-such-bucket", "p")


def test_a_missing_bucket_is_refused_before_any_file_is_hashed(s3, archive, tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "sha256_file", lambda *a, **k: pytest.fail("hashed for a missing bucket"))
    how = "create it with `aws s3 mb s3://no-such-bucket --region us-east-1`, or leave out --s3"
    with pytest.raises(ConfigError, match=re.escape(how)) as refused:
        artifacts.upload_directory(s3, archive, "no-such-bucket", "p")
    assert "sagemaker-us-east-1-<account>, which `upload` creates" in str(refused.value)
    (tmp_path / "model.tar.gz").write_bytes(b"gz")
    with pytest.raises(ConfigError, match="aws s3 mb s3://no-such-bucket"):
        artifacts.upload_file(s3, tmp_path / "model.tar.gz", "no-such-bucket", "model.tar.gz")


def test_a_bucket_that_cannot_be_checked_is_a_warning():
    from botocore.exceptions import ClientError

    class Forbidden:
        def head_bucket(self, **kwargs):
            raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadBucket")

    err = io.StringIO()
    artifacts.check_bucket(Forbidden(), "theirs", err)
    assert "could not check the bucket theirs (403); going on" in err.getvalue()


# --- the command --------------------------------------------------------------------------


def test_cli_upload_twice(s3, archive, capsys):
    argv = ["upload", "--archive", str(archive), "--s3", f"s3://{BUCKET}/models/x", "--part-size-mb", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "uploaded 5 file(s)" in out
    assert f"model data: s3://{BUCKET}/models/x/" in out
    source = json.loads(out.split("ModelDataSource: ", 1)[1].splitlines()[0])
    assert source["S3DataSource"] == {"S3Uri": f"s3://{BUCKET}/models/x/", "S3DataType": "S3Prefix",
                                      "CompressionType": "None"}
    assert f"deploy --name NAME --image IMAGE_URI --model-data s3://{BUCKET}/models/x/" in out

    assert main(argv) == 0
    assert "nothing to upload: all 5 file(s) already in S3 and unchanged" in capsys.readouterr().out


def test_cli_upload_tar_gz(s3, archive, capsys):
    argv = ["upload", "--archive", str(archive), "--s3", f"s3://{BUCKET}/tgz/", "--format", "tar.gz"]
    assert main(argv) == 0
    assert f"model data: s3://{BUCKET}/tgz/model.tar.gz" in capsys.readouterr().out
    body = s3.get_object(Bucket=BUCKET, Key="tgz/model.tar.gz")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert "model/model.safetensors" in tar.getnames()
    assert main(argv) == 0
    assert "nothing to upload" in capsys.readouterr().out


def test_cli_builds_the_archive_and_defaults_the_bucket(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAVA_SESSIONS_HOME", str(tmp_path / "home"))
    checkpoint = write_fake_checkpoint(tmp_path / "my-ckpt")
    assert main(["upload", "--model", str(checkpoint), "--session-ttl", "300"]) == 0
    out = capsys.readouterr().out
    prefix = "llava-sessions/my-ckpt/"
    assert f"model data: s3://sagemaker-us-east-1-123456789012/{prefix}" in out
    stored = sorted(o["Key"] for o in s3.list_objects_v2(
        Bucket="sagemaker-us-east-1-123456789012")["Contents"])
    assert f"{prefix}model/model.safetensors" in stored and f"{prefix}MAR-INF/MANIFEST.json" in stored
    config = s3.get_object(Bucket="sagemaker-us-east-1-123456789012", Key=f"{prefix}model-config.yaml")
    assert "session_ttl_s: 300" in config["Body"].read().decode()


def test_cli_upload_to_a_missing_bucket_fails_first_and_says_how_to_fix_it(s3, archive, monkeypatch, capsys):
    from llava_sessions.commands import upload as upload_command

    monkeypatch.setattr(artifacts, "sha256_file", lambda *a, **k: pytest.fail("hashed for a missing bucket"))
    assert main(["upload", "--archive", str(archive), "--s3", "s3://no-such-bucket/models/x/"]) == 2
    err = capsys.readouterr().err
    assert "bucket 'no-such-bucket' does not exist" in err
    assert "`aws s3 mb s3://no-such-bucket --region us-east-1`" in err and "leave out --s3" in err
    # Checked before the archive is built too (a real checkpoint takes minutes to package).
    monkeypatch.setattr(upload_command, "_archive", lambda args: pytest.fail("built the archive first"))
    assert main(["upload", "--model", "any", "--s3", "s3://no-such-bucket/models/x/"]) == 2
    assert "aws s3 mb s3://no-such-bucket" in capsys.readouterr().err


def test_cli_refusals(s3, archive, capsys):
    assert main(["upload", "--archive", str(archive.parent), "--s3", f"s3://{BUCKET}/p/"]) == 2
    assert "not a TorchServe model archive folder" in capsys.readouterr().err
    assert main(["upload", "--archive", str(archive), "--s3", f"s3://{BUCKET}/p/model.tar.gz"]) == 2
    assert "--format tar.gz" in capsys.readouterr().err


# --- progress --------------------------------------------------------------------------------


def test_progress_prints_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    with ByteProgress(100 * MIB, "uploaded", stream=stream) as bar:
        for _ in range(100):
            bar(MIB)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # 25%, 50%, 75%, then the final line
    assert lines[-1].startswith("100%  100.0 MiB / 100.0 MiB") and lines[-1].endswith("uploaded")
    assert "\r" not in stream.getvalue()


def test_progress_redraws_one_line_on_a_terminal():
    stream = io.StringIO()
    now = [0.0]
    bar = ByteProgress(10, stream=stream, tty=True, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1
        bar(1)
    bar.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 11 and "[" + "#" * 30 + "] 100%" in text


def test_ticker_prints_on_change_and_now_and_then():
    stream = io.StringIO()
    now = [0.0]
    ticker = StatusTicker("endpoint e", stream=stream, tty=False, line_every_s=60, clock=lambda: now[0])
    for status in ["Creating"] * 5 + ["InService"]:
        ticker.tick(status)
        now[0] += 30
    assert stream.getvalue().splitlines() == [
        "endpoint e: Creating (0s)", "endpoint e: Creating (1m00s)", "endpoint e: Creating (2m00s)",
        "endpoint e: InService (2m30s)",
    ]
