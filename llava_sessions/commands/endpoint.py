"""``llava-sessions deploy | update | teardown`` (deploy/endpoint.py does the work)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from llava_sessions.commands import aws_arguments
from llava_sessions.deploy import aws
from llava_sessions.deploy.endpoint import (
    DEFAULTS,
    DeployError,
    ENV_ROLE,
    Lifecycle,
    VARIANT,
    Steps,
    check_endpoint_name,
    check_image_exists,
    check_model_data_exists,
    parse_ecr_image,
    plan_from_args,
)
from llava_sessions.errors import ConfigError


def register(commands) -> None:
    deploy = commands.add_parser(
        "deploy", help="create the SageMaker model, endpoint config and endpoint, and wait for it",
        description="Create (or find already there) a SageMaker real-time endpoint serving the model "
        "archive that `upload` put on S3 with the image `image push` built. Idempotent. Checks first that "
        "the image is in ECR and the model data on S3. If it fails partway, it names what it created; "
        "`teardown` removes it.",
    )
    _spec_arguments(deploy, update=False)
    aws_arguments(deploy)
    deploy.set_defaults(run=cmd_deploy)

    update = commands.add_parser(
        "update", help="roll an endpoint to a new model or settings, then delete the old config and model",
        description="Options not given keep the endpoint's current values. Builds the new model and "
        "config beside the ones in service, rolls the endpoint to them, then deletes the old ones (it "
        "names them before it starts).",
    )
    _spec_arguments(update, update=True)
    aws_arguments(update)
    update.set_defaults(run=cmd_update)

    teardown = commands.add_parser(
        "teardown", help="delete an endpoint, its endpoint config and model, and its autoscaling",
        description="Delete the endpoint's scaling policies, the endpoint, every endpoint config and model "
        "named after it (<name>-config-<hash>, <name>-model-<hash>), including those a failed deploy or "
        "update left behind. It names them before it starts; exit 0 when there is nothing to delete.",
    )
    teardown.add_argument("--name", required=True, help="endpoint name")
    teardown.add_argument("--keep-model", action="store_true", help="keep the SageMaker model(s)")
    _wait_arguments(teardown)
    _dry_run_argument(teardown)
    aws_arguments(teardown)
    teardown.set_defaults(run=cmd_teardown)


def _spec_arguments(parser, *, update: bool) -> None:
    def default(when_created: str) -> str:
        """An update keeps what the endpoint has; a deploy starts from the built-in default."""
        return " (default: the endpoint's current value)" if update else f" (default: {when_created})"

    parser.add_argument("--name", required=True, help="endpoint name")
    parser.add_argument("--image", required=not update,
                        help="container image URI in ECR" + (default("") if update else ""))
    parser.add_argument("--model-data", required=not update, metavar="S3_URI",
                        help="s3://bucket/prefix/ from `upload`, or an s3://.../model.tar.gz"
                        + (default("") if update else ""))
    parser.add_argument("--instance-type", help="instance type" + default(DEFAULTS["instance_type"]))
    parser.add_argument("--instance-count", type=int, help="initial instances" + default("1"))
    parser.add_argument("--role", help="execution role ARN"
                        + default(f"${ENV_ROLE}, or the sagemaker SDK's execution role when installed"))
    parser.add_argument("--memory-budget-gb", type=float,
                        help="GiB of device memory a worker's sessions may hold" + default("automatic"))
    parser.add_argument("--session-ttl", type=int, help="session life in seconds" + default("the archive's"))
    parser.add_argument("--download-timeout", type=int,
                        help="seconds to copy the model in, at most 3600" + default(str(DEFAULTS["download_timeout_s"])))
    parser.add_argument("--startup-timeout", type=int, help="seconds for the container to pass /ping, at most 3600"
                        + default(str(DEFAULTS["startup_timeout_s"])))
    parser.add_argument("--routing", choices=["LEAST_OUTSTANDING_REQUESTS", "RANDOM"],
                        help="how new sessions are spread" + default("LEAST_OUTSTANDING_REQUESTS"))
    parser.add_argument("--env", action="append", metavar="KEY=VALUE",
                        help="extra container environment, e.g. LLAVA_SESSIONS_S3_ALLOWED_BUCKETS=my-images")
    parser.add_argument("--autoscale-min", type=int, help="minimum instances (default: --instance-count)")
    parser.add_argument("--autoscale-max", type=int, help="maximum instances; turns on target-tracking autoscaling")
    parser.add_argument("--autoscale-target", type=float,
                        help="invocations per instance per minute to aim for (default: 30)")
    _wait_arguments(parser)
    _dry_run_argument(parser)


def _dry_run_argument(parser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="print every AWS call that would change something, with its arguments; make only "
                        "read-only calls (describe, list, the image and model data checks)")


def _wait_arguments(parser) -> None:
    parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="wait for the endpoint, with progress (default: --wait)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait at most (default 3600)")
    parser.add_argument("--poll", type=float, default=30, help=argparse.SUPPRESS)


def lifecycle(args) -> Lifecycle:
    return Lifecycle(
        sm=aws.client("sagemaker", args.region, args.profile),
        autoscaling=aws.client("application-autoscaling", args.region, args.profile),
        poll_s=args.poll, timeout_s=args.timeout,
    )


def _run(action: Callable[[], None]) -> int:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        action()
    except DeployError as exc:
        print(f"llava-sessions: {exc}", file=sys.stderr)
        return 1
    except (ClientError, BotoCoreError) as exc:
        print(f"llava-sessions: AWS refused: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_image(args, image: str) -> str:
    """The image is in ECR in the endpoint's region (read-only: ecr describe_images)."""
    ecr = aws.client("ecr", args.region, args.profile)
    return check_image_exists(ecr, image, ecr.meta.region_name)


def _go(life: Lifecycle, steps: Steps, args, checked: list[str]) -> None:
    """--dry-run prints the steps; otherwise they run."""
    if args.dry_run:
        steps.found[:0] = checked
        print(steps.format())
    else:
        life.run(steps)


def cmd_deploy(args) -> int:
    plan = plan_from_args(args)
    life = lifecycle(args)

    def action() -> None:
        checked = [_check_image(args, plan.model.image),
                   check_model_data_exists(aws.client("s3", args.region, args.profile), plan.model.model_data)]
        _go(life, life.plan_deploy(plan, wait=args.wait), args, checked)

    return _run(action)


def cmd_update(args) -> int:
    life = lifecycle(args)

    def action() -> None:
        current = life.endpoint(check_endpoint_name(args.name))
        if current is None:
            raise ConfigError(f"no endpoint {args.name}: create it with `llava-sessions deploy`")
        config = life.endpoint_config(current["EndpointConfigName"]) or {"ProductionVariants": [{}]}
        variant = next((v for v in config["ProductionVariants"] if v.get("VariantName") == VARIANT),
                       config["ProductionVariants"][0] if config["ProductionVariants"] else {})
        model = life.model(variant["ModelName"]) if variant.get("ModelName") else None
        plan = plan_from_args(args, {"model": model, "variant": variant})
        checked = []
        try:  # the current image too: new instances pull it, and ECR may have expired it
            parse_ecr_image(plan.model.image)
        except ConfigError:
            pass  # not ours to judge: this endpoint was not deployed with an ECR image by `deploy`
        else:
            checked.append(_check_image(args, plan.model.image))
        if args.model_data:
            checked.append(check_model_data_exists(aws.client("s3", args.region, args.profile),
                                                   plan.model.model_data))
        _go(life, life.plan_update(plan, wait=args.wait), args, checked)

    return _run(action)


def cmd_teardown(args) -> int:
    name = check_endpoint_name(args.name)
    life = lifecycle(args)
    return _run(lambda: _go(life, life.plan_teardown(name, keep_model=args.keep_model, wait=args.wait),
                            args, []))

