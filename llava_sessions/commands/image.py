"""``llava-sessions image build | push`` (deploy/image.py does the work)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llava_sessions.deploy.image import (
    ACCOUNT_PLACEHOLDER,
    DEFAULT_PLATFORM,
    DEFAULT_REPOSITORY,
    DLC_VERSION,
    Executor,
    ImageError,
    KEEP_IMAGES,
    UNTAGGED_EXPIRY_DAYS,
    build_steps,
    format_plan,
    options_from_args,
    push_steps,
)

def register(commands) -> None:
    image = commands.add_parser(
        "image", help="build the serving container, or build and push it to ECR",
        description="The serving container (container/Dockerfile): `build` builds it locally, `push` "
        "also creates the ECR repository when missing and pushes. --dry-run prints every AWS call and "
        "docker command and runs none.",
    )
    actions = image.add_subparsers(required=True, metavar="ACTION")
    build = actions.add_parser("build", help="build the image locally, tagged REPOSITORY:TAG and :latest")
    _image_arguments(build)
    build.set_defaults(run=cmd_build)
    push = actions.add_parser(
        "push", help="ensure the ECR repository, log in, build, tag and push",
        description="Idempotent: the repository is created when missing (scan on push, a lifecycle policy); "
        "the image is built and pushed as <account>.dkr.ecr.<region>.amazonaws.com/REPOSITORY:TAG and :latest.",
    )
    _image_arguments(push)
    push.set_defaults(run=cmd_push)


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION / profile)")
    parser.add_argument("--profile", help="AWS profile (default: AWS_PROFILE)")
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY, help=f"image name / ECR repository (default {DEFAULT_REPOSITORY})")
    parser.add_argument("--tag", help="image tag besides `latest` (default: the git short revision, -dirty "
                                      "with uncommitted changes)")
    parser.add_argument("--base-image", help="FROM image (default: the SageMaker PyTorch "
                                             f"{DLC_VERSION} inference GPU image of the region)")
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, help=f"target platform (default {DEFAULT_PLATFORM})")
    parser.add_argument("--context", type=Path, help="the llava-sessions checkout to build (default: this one)")
    parser.add_argument("--keep-images", type=int, default=KEEP_IMAGES,
                        help=f"lifecycle policy: images ECR keeps (default {KEEP_IMAGES}; untagged ones "
                             f"expire after {UNTAGGED_EXPIRY_DAYS} days)")
    parser.add_argument("--dry-run", action="store_true", help="print the AWS calls and docker commands; run none")


def cmd_build(args) -> int:
    return _run(args, push=False)


def cmd_push(args) -> int:
    return _run(args, push=True)


def _run(args, *, push: bool) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        opts = options_from_args(args, push=push)
        steps = push_steps(opts) if push else build_steps(opts)
        if args.dry_run:
            print(f"llava-sessions image {'push' if push else 'build'} --dry-run: nothing runs. The plan:")
            if push and ACCOUNT_PLACEHOLDER in opts.registry:
                print(f"(no AWS credentials here: the account shows as {ACCOUNT_PLACEHOLDER})")
            elif push:
                print(f"(read-only lookup made for it: aws sts GetCallerIdentity -> registry {opts.registry})")
            print(format_plan(steps))
            return 0
        Executor(profile=args.profile).run(steps)
    except ImageError as exc:
        print(f"llava-sessions: {exc}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as exc:
        print(f"llava-sessions: AWS refused: {exc}", file=sys.stderr)
        return 1
    refs = opts.image_refs()
    print(f"llava-sessions: {'pushed' if push else 'built'} {' and '.join(refs)}")
    if push:
        print(f"deploy it: llava-sessions deploy --name NAME --image {refs[0]} --model-data s3://...")
    return 0

