"""``llava-sessions upload``: the model archive to S3 (deploy/artifacts.py does the work)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llava_sessions.commands import archive_from_args, aws_arguments, model_arguments
from llava_sessions.deploy import aws
from llava_sessions.deploy.artifacts import (
    DEFAULT_CONCURRENCY,
    DEFAULT_PART_SIZE,
    DigestCache,
    MIB,
    TARBALL_NAME,
    UploadResult,
    check_bucket,
    default_bucket,
    human_bytes,
    parse_s3_uri,
    transfer_config,
    upload_directory,
    upload_file,
    write_tarball,
)
from llava_sessions.errors import ConfigError


def register(commands) -> None:
    upload = commands.add_parser(
        "upload",
        help="package the model archive and upload it to S3 for a SageMaker endpoint",
        description="Build the model archive (as `archive` does) and upload it to S3: uncompressed "
        "under a prefix (for ModelDataSource S3Prefix, CompressionType None) or as model.tar.gz. "
        "Files already there with the same SHA-256 are skipped; prints the URI for `deploy`.",
    )
    model_arguments(upload)
    upload.add_argument("--s3", metavar="s3://BUCKET/PREFIX",
                        help="destination (default: s3://sagemaker-<region>-<account>/llava-sessions/<model>/)")
    upload.add_argument("--format", default="dir", choices=["dir", "tar.gz"],
                        help="dir: files under the prefix, uncompressed (default); tar.gz: one model.tar.gz")
    upload.add_argument("--archive", type=Path, metavar="DIR",
                        help="upload this already built archive folder instead of building one")
    upload.add_argument("--delete", action="store_true",
                        help="also delete objects under the prefix that the archive no longer has")
    upload.add_argument("--part-size-mb", type=int, default=DEFAULT_PART_SIZE // MIB,
                        help="multipart part size and threshold in MiB (default 64)")
    upload.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="parts uploaded at once (default 8)")
    aws_arguments(upload)
    upload.set_defaults(run=cmd_upload)


def cmd_upload(args) -> int:
    if args.part_size_mb < 5 or args.concurrency < 1:
        raise ConfigError("--part-size-mb must be at least 5 (S3's minimum part) and --concurrency at least 1")
    if args.format == "tar.gz" and args.delete:
        raise ConfigError("--delete applies to --format dir only")
    if args.format == "dir" and args.s3 and args.s3.endswith(".tar.gz"):
        raise ConfigError("--s3 names a .tar.gz object: add --format tar.gz, or give a prefix")
    boto_session = aws.session(args.region, args.profile)
    s3 = aws.client("s3", args.region, args.profile)
    if args.s3:
        bucket, key = parse_s3_uri(args.s3)
        check_bucket(s3, bucket)  # before building the archive and hashing it
    archive_dir, model_name = _archive(args)
    if not args.s3:
        bucket, key = default_bucket(boto_session), f"llava-sessions/{model_name}/"
    config = transfer_config(args.part_size_mb * MIB, args.concurrency)
    cache = DigestCache(archive_dir.parent / f".{archive_dir.name}.sha256.json")
    if args.format == "tar.gz":
        tarball = write_tarball(archive_dir, archive_dir.parent / TARBALL_NAME)
        if not key.endswith(".tar.gz"):
            key = key.rstrip("/") + "/" + TARBALL_NAME if key.strip("/") else TARBALL_NAME
        result = upload_file(s3, tarball, bucket, key, config=config, digest_cache=cache, bucket_checked=True)
    else:
        result = upload_directory(s3, archive_dir, bucket, key, delete=args.delete, config=config,
                                  digest_cache=cache, bucket_checked=True)
    _report(result)
    return 0


def _archive(args) -> tuple[Path, str]:
    """The archive folder to upload and a name for the default prefix."""
    if args.archive:
        from llava_sessions.archive import check_archive_folder

        archive = check_archive_folder(args.archive, "--archive")
        return archive, archive.name
    from llava_sessions import models

    model_dir = models.resolve_model(args.model)
    archive = archive_from_args(args, model_dir, models.archive_dir_for(model_dir), "no-archive")
    print(f"archive: {archive}", file=sys.stderr)
    return archive, model_dir.name


def _report(result: UploadResult) -> None:
    if result.uploaded:
        print(f"uploaded {len(result.uploaded)} file(s) ({human_bytes(result.bytes_uploaded)}), "
              f"{len(result.skipped)} unchanged")
    else:
        print(f"nothing to upload: all {len(result.skipped)} file(s) already in S3 and unchanged")
    if result.deleted:
        print(f"deleted {len(result.deleted)} stale object(s)")
    print(f"model data: {result.uri}")
    print(f"ModelDataSource: {json.dumps(result.model_data_source)}")
    print(f"next: llava-sessions deploy --name NAME --image IMAGE_URI --model-data {result.uri}")

