"""``llava-sessions upload``: the model archive on S3, ready for a SageMaker Model.

Two layouts:

* ``dir`` (default): the archive folder's files uncompressed under a prefix
  ending in ``/``. A Model names it as ``ModelDataSource.S3DataSource`` with
  ``S3DataType: S3Prefix`` and ``CompressionType: None``; SageMaker copies the
  files to ``/opt/ml/model`` without a gunzip pass over the weights.
* ``tar.gz``: one ``model.tar.gz`` (files at the tarball's root), built
  locally by streaming from disk, for ``ModelDataUrl``.

Every object carries its SHA-256 twice: S3 checks ``ChecksumAlgorithm=SHA256``
per part on arrival, and the whole file's hex digest travels in the object's
metadata (``x-amz-meta-sha256``). A file whose key already holds an object of
the same size and digest is skipped, so a second run uploads nothing. Nothing
is deleted unless ``--delete`` is given. Torch-free; boto3 is imported lazily.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava_sessions.deploy.progress import ByteProgress, human_bytes

from llava_sessions.errors import ConfigError

DIGEST_METADATA = "sha256"  # x-amz-meta-sha256: hex SHA-256 of the whole object
TARBALL_NAME = "model.tar.gz"
MIB = 1 << 20
# Large weights go up in 64 MiB parts, 8 at a time (S3 allows 10,000 parts:
# 640 GiB per file at this size).
DEFAULT_PART_SIZE = 64 * MIB
DEFAULT_CONCURRENCY = 8


# --- S3 locations -----------------------------------------------------------------


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); the key may be empty."""
    if not uri.startswith("s3://"):
        raise ConfigError(f"expected an s3://bucket/prefix URI, got {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ConfigError(f"no bucket in {uri!r}; expected s3://bucket/prefix")
    return bucket, key


def prefix_uri(bucket: str, prefix: str) -> str:
    """The S3Prefix form SageMaker wants: always ending in ``/``."""
    prefix = prefix.strip("/")
    return f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"


def model_data_source(uri: str) -> dict[str, Any]:
    """``ModelDataSource`` for an uncompressed prefix (``.../``) or a ``.tar.gz`` object."""
    parse_s3_uri(uri)
    if uri.endswith(".tar.gz"):
        return {"S3DataSource": {"S3Uri": uri, "S3DataType": "S3Object", "CompressionType": "Gzip"}}
    if not uri.endswith("/"):
        raise ConfigError(f"an uncompressed model prefix must end with '/': {uri!r}")
    return {"S3DataSource": {"S3Uri": uri, "S3DataType": "S3Prefix", "CompressionType": "None"}}


# --- local files -------------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    path: Path
    key: str
    size: int
    sha256: str


def archive_files(archive_dir: Path) -> list[tuple[Path, str]]:
    """(path, relative posix name) of every regular file under the archive folder, sorted."""
    if not archive_dir.is_dir():
        raise ConfigError(f"{archive_dir} is not an archive directory")
    files = sorted(
        (p, p.relative_to(archive_dir).as_posix()) for p in archive_dir.rglob("*") if p.is_file()
    )
    if not files:
        raise ConfigError(f"{archive_dir} is empty")
    return files


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
            if progress:
                progress(len(block))
    return digest.hexdigest()


class DigestCache:
    """SHA-256 of local files keyed by (path, size, mtime): reruns don't re-read 14 GB of weights."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, list] = {}
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def digests(self, paths: Iterable[Path], *, stream=None) -> dict[Path, str]:
        paths = list(paths)
        stats = {p: p.stat() for p in paths}
        out: dict[Path, str] = {}
        todo = []
        for p in paths:
            hit = self.entries.get(str(p.resolve()))
            st = stats[p]
            if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                out[p] = hit[2]
            else:
                todo.append(p)
        if todo:
            total = sum(stats[p].st_size for p in todo)
            with ByteProgress(total, "hashing", stream=stream) as bar:
                for p in todo:
                    out[p] = sha256_file(p, bar)
                    st = stats[p]
                    self.entries[str(p.resolve())] = [st.st_size, st.st_mtime_ns, out[p]]
            self._save()
        return out

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.entries, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a cache only


def write_tarball(archive_dir: Path, dest: Path, *, compresslevel: int = 1) -> Path:
    """``dest`` (.tar.gz) holding the archive's files at its root, byte-identical for identical inputs.

    Files stream from disk through gzip (level 1: safetensors barely compress,
    speed matters more). Timestamps and owners are zeroed so a rebuild of
    unchanged files gives the same bytes, and the upload is skipped.
    """
    files = archive_files(archive_dir)
    stamp = json.dumps(
        [compresslevel] + [[name, p.stat().st_size, p.stat().st_mtime_ns] for p, name in files]
    )
    stamp_path = dest.with_name(f".{dest.name}.inputs")
    if dest.is_file() and stamp_path.is_file() and stamp_path.read_text() == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    total = sum(p.stat().st_size for p, _ in files)
    with ByteProgress(total, f"packing {dest.name}") as bar, tmp.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path, name in files:
                    info = tarfile.TarInfo(name)
                    info.size = path.stat().st_size
                    info.mode = 0o644
                    info.mtime = 0
                    with path.open("rb") as f:
                        tar.addfile(info, _CountingReader(f, bar))
    os.replace(tmp, dest)
    stamp_path.write_text(stamp)
    return dest


class _CountingReader:
    def __init__(self, f, progress: Callable[[int], None]):
        self.f, self.progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.progress(len(data))
        return data


# --- upload --------------------------------------------------------------------------


@dataclass
class UploadResult:
    uri: str  # what deploy's --model-data takes
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0

    @property
    def model_data_source(self) -> dict[str, Any]:
        return model_data_source(self.uri)


def transfer_config(part_size: int = DEFAULT_PART_SIZE, concurrency: int = DEFAULT_CONCURRENCY,
                    threshold: int | None = None):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=threshold if threshold is not None else part_size,
        multipart_chunksize=part_size,
        max_concurrency=concurrency,
        use_threads=concurrency > 1,
    )


def check_bucket(s3, bucket: str, err=None) -> None:
    """Refuse a bucket that does not exist before hashing gigabytes of weights for it.

    Any other answer (403: no s3:ListBucket on the bucket itself) is a warning: the upload may
    still be allowed."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = _code(exc)
        if code in ("404", "NoSuchBucket", "NotFound"):
            region = s3.meta.region_name
            raise ConfigError(
                f"bucket {bucket!r} does not exist (or is in another account): create it with "
                f"`aws s3 mb s3://{bucket} --region {region}`, or leave out --s3 to upload to the default "
                f"bucket sagemaker-{region}-<account>, which `upload` creates"
            ) from None
        print(f"could not check the bucket {bucket} ({code or exc}); going on", file=err or sys.stderr)


def upload_directory(s3, archive_dir: Path, bucket: str, prefix: str, *, delete: bool = False,
                     config=None, digest_cache: DigestCache | None = None, stream=None,
                     bucket_checked: bool = False) -> UploadResult:
    """Upload the archive folder's files under ``prefix``; unchanged ones are skipped.

    The bucket is checked first (``check_bucket``) unless the caller already did."""
    stream = stream if stream is not None else sys.stderr
    prefix = prefix.strip("/")
    if delete and not prefix:
        raise ConfigError("--delete needs a prefix: it would otherwise prune the whole bucket")
    key_prefix = f"{prefix}/" if prefix else ""
    pairs = archive_files(archive_dir)
    if not bucket_checked:
        check_bucket(s3, bucket, stream)
    digests = (digest_cache or DigestCache(None)).digests([p for p, _ in pairs], stream=stream)
    files = [LocalFile(p, key_prefix + name, p.stat().st_size, digests[p]) for p, name in pairs]
    remote = _list_sizes(s3, bucket, key_prefix)
    result = UploadResult(prefix_uri(bucket, prefix))
    todo = []
    for f in files:
        if remote.get(f.key) == f.size and _remote_digest(s3, bucket, f.key) == f.sha256:
            result.skipped.append(f.key)
        else:
            todo.append(f)
    _upload(s3, bucket, todo, result, config or transfer_config(), stream)
    if delete:
        stale = sorted(set(remote) - {f.key for f in files})
        _delete(s3, bucket, stale)
        result.deleted = stale
    return result


def upload_file(s3, path: Path, bucket: str, key: str, *, config=None,
                digest_cache: DigestCache | None = None, stream=None, bucket_checked: bool = False) -> UploadResult:
    """Upload one file (the tarball) to ``key`` unless the same bytes are already there."""
    stream = stream if stream is not None else sys.stderr
    if not bucket_checked:
        check_bucket(s3, bucket, stream)
    digest = (digest_cache or DigestCache(None)).digests([path], stream=stream)[path]
    local = LocalFile(path, key, path.stat().st_size, digest)
    result = UploadResult(f"s3://{bucket}/{key}")
    if _list_sizes(s3, bucket, key).get(key) == local.size and _remote_digest(s3, bucket, key) == digest:
        result.skipped.append(key)
    else:
        _upload(s3, bucket, [local], result, config or transfer_config(), stream)
    return result


def _upload(s3, bucket: str, files: list[LocalFile], result: UploadResult, config, stream) -> None:
    if not files:
        return
    total = sum(f.size for f in files)
    print(f"uploading {len(files)} file(s), {human_bytes(total)}, to {result.uri}", file=stream)
    with ByteProgress(total, "uploaded", stream=stream) as bar:
        for f in files:
            s3.upload_file(
                str(f.path), bucket, f.key,
                ExtraArgs={"ChecksumAlgorithm": "SHA256", "Metadata": {DIGEST_METADATA: f.sha256}},
                Config=config, Callback=bar,
            )
            result.uploaded.append(f.key)
            result.bytes_uploaded += f.size


def _list_sizes(s3, bucket: str, prefix: str) -> dict[str, int]:
    from botocore.exceptions import ClientError

    sizes: dict[str, int] = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                sizes[obj["Key"]] = obj["Size"]
    except ClientError as exc:
        if _code(exc) == "NoSuchBucket":
            raise ConfigError(f"bucket {bucket!r} does not exist (or is in another account)") from None
        raise
    return sizes


def _remote_digest(s3, bucket: str, key: str) -> str | None:
    return s3.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(DIGEST_METADATA)


def _delete(s3, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):
        batch = keys[start:start + 1000]
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})


def _code(exc) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def default_bucket(boto_session) -> str:
    """SageMaker's default bucket ``sagemaker-<region>-<account>``, created if missing (as the SDK does)."""
    from botocore.exceptions import ClientError

    region = boto_session.region_name
    account = boto_session.client("sts").get_caller_identity()["Account"]
    bucket = f"sagemaker-{region}-{account}"
    s3 = boto_session.client("s3")
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise ConfigError(f"cannot use the default bucket {bucket} ({exc}); pass --s3") from None
        kwargs = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **kwargs)
        print(f"created the default bucket s3://{bucket}", file=sys.stderr)
    return bucket


# --- the command ------------------------------------------------------------------------


