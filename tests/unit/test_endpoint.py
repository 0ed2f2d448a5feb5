"""deploy / update / teardown and autoscaling against moto's SageMaker and Application Auto Scaling.

moto 5 checks instance types against an old list that lacks ml.g5.* (the default), so the tests
deploy ml.g4dn.xlarge. moto has no update_endpoint: the update test sends that one call through
botocore's Stubber (which validates it against the real service model) and applies its effect to
moto's endpoint record, so everything around it (new model and config, waiting, pruning) is real.
The images the tests deploy are pushed to moto's ECR (deploy checks that they exist).
"""

from __future__ import annotations

import io
import json
import re

import pytest
from llava_sessions.deploy import endpoint as ep

from llava_sessions.cli import _parser, main
from llava_sessions.commands import endpoint as endpoint_command
from llava_sessions.errors import ConfigError
from tests.fakes import isolate_from_aws

REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/llava-sagemaker"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/llava-sessions:abc123"
DATA = "s3://model-bucket/models/llava/"
TYPE = "ml.g4dn.xlarge"  # moto rejects ml.g5.*
RESOURCE = "endpoint/chat/variant/AllTraffic"
PUSHED_TAGS = ("abc123", "def456", "v2")  # the tags of IMAGE's repository in moto's ECR


def push_image(tag, region=REGION):
    """An image manifest in moto's ECR under ``llava-sessions:<tag>``; returns its digest."""
    import boto3

    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 1,
                   "digest": "sha256:" + "0" * 64},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 1,
                    "digest": "sha256:" + tag.encode().hex().ljust(64, "0")[:64]}],
    })
    ecr = boto3.client("ecr", region_name=region)
    try:
        ecr.create_repository(repositoryName="llava-sessions")
    except ecr.exceptions.RepositoryAlreadyExistsException:
        pass
    return ecr.put_image(repositoryName="llava-sessions", imageManifest=manifest, imageTag=tag)["image"][
        "imageId"]["imageDigest"]


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws

    isolate_from_aws(monkeypatch, REGION, also_unset=(ep.ENV_ROLE,))
    with mock_aws():
        import boto3

        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket="model-bucket")
        s3.put_object(Bucket="model-bucket", Key="models/llava/MAR-INF/MANIFEST.json", Body=b"{}")
        s3.put_object(Bucket="model-bucket", Key="tgz/model.tar.gz", Body=b"gz")
        for tag in PUSHED_TAGS:
            push_image(tag)
        yield boto3.client("sagemaker", region_name=REGION), boto3.client("application-autoscaling",
                                                                           region_name=REGION)


def moto_endpoint(name="chat"):
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[ACCOUNT][REGION].endpoints[name]


def deploy_argv(*extra, name="chat"):
    return ["deploy", "--name", name, "--image", IMAGE, "--model-data", DATA, "--instance-type", TYPE,
            "--role", ROLE, "--poll", "0", *extra]


def plan(*extra, command="deploy"):
    argv = deploy_argv(*extra)
    argv[0] = command
    return ep.plan_from_args(_parser().parse_args(argv))


def life(aws, sleep=lambda s: None, clock=None, **kwargs):
    sm, autoscaling = aws
    extra = {"clock": clock} if clock else {}
    return ep.Lifecycle(sm, autoscaling, out=io.StringIO(), err=io.StringIO(), poll_s=30, sleep=sleep,
                        **extra, **kwargs)


def names(sm):
    return (sorted(m["ModelName"] for m in sm.list_models()["Models"]),
            sorted(c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]))


# --- deploy ---------------------------------------------------------------------------------


def test_deploy_creates_model_config_and_endpoint(aws, capsys):
    sm, _ = aws
    assert main(deploy_argv("--memory-budget-gb", "10", "--session-ttl", "600",
                            "--env", "LLAVA_SESSIONS_S3_ALLOWED_BUCKETS=my-images")) == 0
    out = capsys.readouterr().out
    assert "endpoint chat is InService" in out and "llava-sessions chat --endpoint chat" in out

    endpoint = sm.describe_endpoint(EndpointName="chat")
    assert endpoint["EndpointStatus"] == "InService"
    config_name = endpoint["EndpointConfigName"]
    assert re.fullmatch(r"chat-config-[0-9a-f]{8}", config_name)
    variant = sm.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"][0]
    assert re.fullmatch(r"chat-model-[0-9a-f]{8}", variant["ModelName"])
    assert variant == {
        "VariantName": "AllTraffic", "ModelName": variant["ModelName"], "InstanceType": TYPE,
        "InitialInstanceCount": 1, "ModelDataDownloadTimeoutInSeconds": 1800,
        "ContainerStartupHealthCheckTimeoutInSeconds": 1800,
        "RoutingConfig": {"RoutingStrategy": "LEAST_OUTSTANDING_REQUESTS"},
    }
    model = sm.describe_model(ModelName=variant["ModelName"])
    assert model["ExecutionRoleArn"] == ROLE
    container = model["PrimaryContainer"]
    assert container["Image"] == IMAGE
    assert container["ModelDataSource"] == {
        "S3DataSource": {"S3Uri": DATA, "S3DataType": "S3Prefix", "CompressionType": "None"}}
    assert "ModelDataUrl" not in container
    assert container["Environment"] == {
        "LLAVA_SESSIONS_MEMORY_BUDGET_BYTES": str(10 << 30),
        "LLAVA_SESSIONS_SESSION_TTL_S": "600",
        "LLAVA_SESSIONS_S3_ALLOWED_BUCKETS": "my-images",
    }
    tags = sm.list_tags(ResourceArn=endpoint["EndpointArn"])["Tags"]
    assert {"Key": "llava-sessions:endpoint", "Value": "chat"} in tags


def test_deploy_again_does_nothing_and_other_inputs_point_to_update(aws, capsys):
    sm, _ = aws
    assert main(deploy_argv()) == 0
    before = names(sm)
    capsys.readouterr()
    assert main(deploy_argv()) == 0
    assert "already InService with this model and config: nothing to do" in capsys.readouterr().out
    assert names(sm) == before

    assert main(deploy_argv("--instance-count", "2")) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "llava-sessions update" in err
    assert names(sm) == before


def test_names_follow_content():
    base = plan()
    assert plan().model_name == base.model_name and plan().config_name == base.config_name
    bigger = plan("--instance-count", "2")
    assert bigger.model_name == base.model_name and bigger.config_name != base.config_name
    other = plan("--session-ttl", "60")
    assert other.model_name != base.model_name and other.config_name != base.config_name


def test_tarball_model_data_goes_in_model_data_url(aws):
    sm, _ = aws
    argv = deploy_argv()
    argv[argv.index(DATA)] = "s3://model-bucket/tgz/model.tar.gz"
    assert main(argv) == 0
    model = sm.list_models()["Models"][0]["ModelName"]
    container = sm.describe_model(ModelName=model)["PrimaryContainer"]
    assert container["ModelDataUrl"] == "s3://model-bucket/tgz/model.tar.gz"
    assert "ModelDataSource" not in container


def test_defaults_and_refusals(aws, capsys):
    # The default GPU type, which moto cannot create (see the module docstring).
    args = _parser().parse_args(["deploy", "--name", "chat", "--image", IMAGE, "--model-data", DATA,
                                 "--role", ROLE])
    assert ep.plan_from_args(args).variant.instance_type == "ml.g5.2xlarge"
    for bad, message in [
        (["--name", "bad_name"], "endpoint name"),
        (["--model-data", "s3://model-bucket/models/llava"], "end an uncompressed prefix with '/'"),
        (["--autoscale-min", "2"], "--autoscale-max"),
        (["--download-timeout", "7200"], "between 60 and 3600"),
        (["--env", "no-equals"], "KEY=VALUE"),
        (["--model-data", "s3://model-bucket/typo/"], "nothing at s3://model-bucket/typo/: run `llava-sessions upload`"),
        (["--model-data", "s3://no-bucket/x.tar.gz"], "nothing at s3://no-bucket/x.tar.gz"),
    ]:
        argv = deploy_argv()
        flag, value = bad
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += bad
        assert main(argv) == 2, bad
        assert message in capsys.readouterr().err


def test_role_comes_from_the_option_the_environment_or_the_sdk(monkeypatch):
    import sys
    import types

    assert ep.resolve_role(ROLE, environ={ep.ENV_ROLE: "arn:aws:iam::1:role/other"}) == ROLE
    assert ep.resolve_role(None, environ={ep.ENV_ROLE: ROLE}) == ROLE
    monkeypatch.setitem(sys.modules, "sagemaker", None)  # not installed
    with pytest.raises(ConfigError, match="--role arn:aws:iam::<account>:role/<name> or set SAGEMAKER_ROLE_ARN"):
        ep.resolve_role(None, environ={})
    fake_sdk = types.SimpleNamespace(get_execution_role=lambda: ROLE)
    monkeypatch.setitem(sys.modules, "sagemaker", fake_sdk)
    assert ep.resolve_role(None, environ={}) == ROLE
    with pytest.raises(ConfigError, match="IAM role ARN"):
        ep.resolve_role("my-role", environ={})


def test_deploy_without_a_role_says_how_to_pass_one(aws, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "sagemaker", None)
    argv = deploy_argv()
    del argv[argv.index("--role"):argv.index("--role") + 2]
    assert main(argv) == 2
    assert "SAGEMAKER_ROLE_ARN" in capsys.readouterr().err
    monkeypatch.setenv(ep.ENV_ROLE, ROLE)
    assert main(argv) == 0


# --- waiting ----------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_wait_shows_status_until_in_service(aws):
    clock = Clock()
    polls = []

    def sleep(seconds):
        clock.sleep(seconds)
        polls.append(seconds)
        if len(polls) == 3:
            moto_endpoint().endpoint_status = "InService"

    lc = life(aws, sleep=sleep, clock=clock)
    p = plan()
    real_create = lc.sm.create_endpoint

    def create_then_creating(**kwargs):
        real_create(**kwargs)
        moto_endpoint().endpoint_status = "Creating"

    lc.sm.create_endpoint = create_then_creating
    lc.deploy(p)
    assert polls == [30, 30, 30]
    progress = lc.err.getvalue()
    assert "endpoint chat: Creating (0s)" in progress and "endpoint chat: InService (1m30s)" in progress
    assert "is InService" in lc.out.getvalue()


def test_failed_endpoint_reports_its_reason(aws, capsys):
    assert main(deploy_argv("--no-wait")) == 0
    record = moto_endpoint()
    record.endpoint_status, record.failure_reason = "Failed", "CannotStartContainerError: ping failed"
    capsys.readouterr()
    assert main(deploy_argv()) == 1
    err = capsys.readouterr().err
    assert "CannotStartContainerError: ping failed" in err and "teardown --name chat" in err

    lc = life(aws)
    record.endpoint_status = "Creating"

    def fail(seconds):
        record.endpoint_status = "Failed"

    lc.sleep = fail
    with pytest.raises(ep.DeployError, match="endpoint chat failed: CannotStartContainerError"):
        lc.wait("chat", "InService")


def test_waiting_is_bounded(aws):
    assert main(deploy_argv("--no-wait")) == 0
    moto_endpoint().endpoint_status = "Creating"
    clock = Clock()
    lc = life(aws, sleep=clock.sleep, clock=clock, timeout_s=100)
    with pytest.raises(ep.DeployError, match="gave up waiting after 1m40s: endpoint chat is still Creating"):
        lc.wait("chat", "InService")
    assert clock.now == 120  # four polls, 30 s apart


# --- teardown --------------------------------------------------------------------------------


def test_teardown_removes_everything_and_is_idempotent(aws, capsys):
    sm, autoscaling = aws
    assert main(deploy_argv("--autoscale-max", "3")) == 0
    assert main(["teardown", "--name", "chat", "--poll", "0"]) == 0
    out = capsys.readouterr().out
    assert "endpoint chat" in out and "config chat-config-" in out and "model chat-model-" in out
    assert "autoscaling of AllTraffic" in out
    assert sm.list_endpoints()["Endpoints"] == [] and names(sm) == ([], [])
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []

    assert main(["teardown", "--name", "chat", "--poll", "0"]) == 0
    assert "nothing to tear down" in capsys.readouterr().out


def test_teardown_keep_model_and_leftovers_of_a_failed_deploy(aws, capsys):
    sm, _ = aws
    assert main(deploy_argv()) == 0
    assert main(["teardown", "--name", "chat", "--keep-model", "--poll", "0"]) == 0
    models, configs = names(sm)
    assert len(models) == 1 and configs == []

    # A deploy that died after creating its model and config, before the endpoint.
    p = plan("--instance-count", "2")
    lc = life(aws)
    lc.run(ep.Steps("deploy", "chat", steps=lc.plan_deploy(p).steps[:2]))  # CreateModel, CreateEndpointConfig
    sm.create_model(ModelName="chat-model-notours", PrimaryContainer={"Image": IMAGE}, ExecutionRoleArn=ROLE)
    capsys.readouterr()
    assert main(["teardown", "--name", "chat", "--poll", "0"]) == 0
    assert "config chat-config-" in capsys.readouterr().out
    assert names(sm) == (["chat-model-notours"], [])  # only names of our own pattern are touched


# --- autoscaling ----------------------------------------------------------------------------


def test_autoscaling_is_registered_once_and_updated_on_change(aws, capsys):
    _, autoscaling = aws
    assert main(deploy_argv("--autoscale-max", "4", "--autoscale-target", "20")) == 0
    (target,) = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["ScalableDimension"]) == (RESOURCE, ep.SCALABLE_DIMENSION)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)
    (policy,) = autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    config = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyType"] == "TargetTrackingScaling" and config["TargetValue"] == 20.0
    assert config["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}

    capsys.readouterr()
    assert main(deploy_argv("--autoscale-max", "4", "--autoscale-target", "20")) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(deploy_argv("--autoscale-max", "6", "--autoscale-target", "20")) == 0
    assert "autoscaling updated" in capsys.readouterr().out
    (target,) = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["MaxCapacity"] == 6


# --- update ------------------------------------------------------------------------------------


class StubbedUpdate:
    """moto's sagemaker client, except update_endpoint: validated by a Stubber, applied to moto's record."""

    def __init__(self, sm, expected: list[dict]):
        import boto3
        from botocore.stub import Stubber

        self._sm = sm
        self._real = boto3.client("sagemaker", region_name=REGION)
        self._stubber = Stubber(self._real)
        for params in expected:
            self._stubber.add_response("update_endpoint", {"EndpointArn": f"arn:aws:sagemaker:{REGION}:{ACCOUNT}:endpoint/chat"}, params)
        self._stubber.activate()
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._sm, name)

    def update_endpoint(self, **kwargs):
        self._real.update_endpoint(**kwargs)  # raises on unexpected or invalid parameters
        self.calls.append(kwargs)
        record = moto_endpoint(kwargs["EndpointName"])
        record.endpoint_config_name = kwargs["EndpointConfigName"]
        record.endpoint_status = "Updating"

    def done(self):
        self._stubber.assert_no_pending_responses()


def test_update_rolls_to_a_new_config_then_deletes_the_old_one(aws):
    sm, autoscaling = aws
    old = plan("--autoscale-max", "3")
    life(aws).deploy(old)
    new = plan("--image", IMAGE.replace("abc123", "def456"), command="update")
    assert new.model_name != old.model_name and new.config_name != old.config_name

    stub = StubbedUpdate(sm, [{"EndpointName": "chat", "EndpointConfigName": new.config_name,
                               "RetainAllVariantProperties": True}])

    def sleep(seconds):
        moto_endpoint().endpoint_status = "InService"

    lc = ep.Lifecycle(stub, autoscaling, out=io.StringIO(), err=io.StringIO(), sleep=sleep)
    lc.update(new)
    stub.done()
    assert sm.describe_endpoint(EndpointName="chat")["EndpointConfigName"] == new.config_name
    assert names(sm) == ([new.model_name], [new.config_name])
    assert f"deleted the old config {old.config_name}, model {old.model_name}" in lc.out.getvalue()
    # The instance type stayed: autoscaling stayed registered through the update.
    assert len(autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]) == 1

    # Same options again: nothing to update, and update_endpoint is not called.
    lc.update(new)
    assert "nothing to update" in lc.out.getvalue() and len(stub.calls) == 1


def test_update_lifts_autoscaling_when_the_instance_type_changes(aws):
    sm, autoscaling = aws
    life(aws).deploy(plan("--autoscale-max", "3", "--autoscale-target", "15"))
    new = plan("--instance-type", "ml.g4dn.2xlarge", command="update")
    stub = StubbedUpdate(sm, [{"EndpointName": "chat", "EndpointConfigName": new.config_name,
                               "RetainAllVariantProperties": False}])
    seen = []

    def sleep(seconds):
        seen.append(autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"])
        moto_endpoint().endpoint_status = "InService"

    ep.Lifecycle(stub, autoscaling, out=io.StringIO(), err=io.StringIO(), sleep=sleep).update(new)
    stub.done()
    assert seen == [[]]  # deregistered while updating
    (target,) = autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["MaxCapacity"] == 3  # and registered again afterwards
    (policy,) = autoscaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["TargetTrackingScalingPolicyConfiguration"]["TargetValue"] == 15.0


def test_update_keeps_what_is_not_given_and_reports_a_rollback(aws, monkeypatch):
    sm, autoscaling = aws
    life(aws).deploy(plan("--session-ttl", "600"))
    monkeypatch.setenv(ep.ENV_ROLE, "arn:aws:iam::1:role/ignored")  # the current model's role wins
    args = _parser().parse_args(["update", "--name", "chat", "--instance-count", "2"])
    current_variant = sm.describe_endpoint_config(
        EndpointConfigName=sm.describe_endpoint(EndpointName="chat")["EndpointConfigName"])["ProductionVariants"][0]
    current = {"model": sm.describe_model(ModelName=current_variant["ModelName"]), "variant": current_variant}
    new = ep.plan_from_args(args, current)
    assert new.model == plan("--session-ttl", "600").model  # image, data, role, environment kept
    assert new.variant.instance_type == TYPE and new.variant.instance_count == 2

    stub = StubbedUpdate(sm, [{"EndpointName": "chat", "EndpointConfigName": new.config_name,
                               "RetainAllVariantProperties": False}])
    old_config = sm.describe_endpoint(EndpointName="chat")["EndpointConfigName"]

    def roll_back(seconds):
        record = moto_endpoint()
        record.endpoint_config_name, record.endpoint_status = old_config, "InService"
        record.failure_reason = "health check failed"

    lc = ep.Lifecycle(stub, autoscaling, out=io.StringIO(), err=io.StringIO(), sleep=roll_back)
    with pytest.raises(ep.DeployError, match="rolled back to .*health check failed"):
        lc.update(new)


def test_update_from_the_command_line(aws, monkeypatch, capsys):
    sm, autoscaling = aws
    assert main(deploy_argv()) == 0
    new = plan("--image", IMAGE.replace("abc123", "v2"))
    stub = StubbedUpdate(sm, [{"EndpointName": "chat", "EndpointConfigName": new.config_name,
                               "RetainAllVariantProperties": False}])

    def sleep(seconds):
        moto_endpoint().endpoint_status = "InService"

    monkeypatch.setattr(endpoint_command, "lifecycle", lambda args: ep.Lifecycle(stub, autoscaling, sleep=sleep))
    # Only the image is given: data, type, role and environment come from the running endpoint.
    assert main(["update", "--name", "chat", "--image", IMAGE.replace("abc123", "v2")]) == 0
    stub.done()
    assert f"is InService on config {new.config_name}" in capsys.readouterr().out
    assert names(sm) == ([new.model_name], [new.config_name])


def test_update_cli_needs_an_existing_endpoint(aws, capsys):
    assert main(["update", "--name", "chat", "--image", IMAGE]) == 2
    assert "create it with `llava-sessions deploy`" in capsys.readouterr().err


# --- the whole path, as a user types it -------------------------------------------------------


def test_upload_deploy_teardown_from_the_command_line(aws, tmp_path, capsys):
    archive = tmp_path / "llava"
    (archive / "MAR-INF").mkdir(parents=True)
    (archive / "MAR-INF" / "MANIFEST.json").write_text("{}")
    (archive / "model-config.yaml").write_text("minWorkers: 1\n")

    assert main(["upload", "--archive", str(archive), "--s3", "s3://model-bucket/models/llava", "--delete"]) == 0
    printed = capsys.readouterr().out
    uri = printed.split("model data: ", 1)[1].split()[0]
    assert uri == DATA

    assert main(["deploy", "--name", "chat", "--image", IMAGE, "--model-data", uri, "--instance-type", TYPE,
                 "--role", ROLE, "--autoscale-max", "2", "--poll", "0"]) == 0
    assert "endpoint chat is InService" in capsys.readouterr().out
    sm, autoscaling = aws
    model = sm.describe_model(ModelName=sm.list_models()["Models"][0]["ModelName"])
    assert model["PrimaryContainer"]["ModelDataSource"]["S3DataSource"]["S3Uri"] == uri

    assert main(["teardown", "--name", "chat", "--poll", "0"]) == 0
    assert sm.list_endpoints()["Endpoints"] == [] and names(sm) == ([], [])
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_the_test_extra_brings_a_working_moto_server():
    """`pip install .[test]` gives moto_server its web framework (moto[server]), for trying the
    control plane against a local AWS stand-in."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    server = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    assert server, "moto_server is not installed beside this Python"
    run = subprocess.run([server, "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "usage: moto_server" in run.stdout, run.stderr[-2000:]


# --- --dry-run ----------------------------------------------------------------------------------

READ_ONLY = re.compile(r"^(Describe|List|Head|Get)[A-Z]")
PLANNED = re.compile(r"^\s+aws (sagemaker|application-autoscaling) ([A-Za-z]+)( |$)", re.M)


@pytest.fixture
def api_calls(monkeypatch):
    """The name of every AWS operation any boto3 client makes, in order."""
    from botocore.client import BaseClient

    calls = []
    real = BaseClient._make_api_call

    def record(self, operation_name, api_params):
        calls.append(operation_name)
        return real(self, operation_name, api_params)

    monkeypatch.setattr(BaseClient, "_make_api_call", record)
    return calls


def changes(calls):
    return [c for c in calls if not READ_ONLY.match(c)]


def planned(out):
    """The changing calls a dry run lists, in order (the waits poll DescribeEndpoint, read-only)."""
    return [op for _, op, _ in PLANNED.findall(out) if not READ_ONLY.match(op)]


def test_deploy_dry_run_prints_every_call_and_changes_nothing(aws, api_calls, capsys):
    sm, autoscaling = aws
    assert main(deploy_argv("--autoscale-max", "3", "--session-ttl", "600", "--dry-run")) == 0
    out = capsys.readouterr().out
    p = plan("--autoscale-max", "3", "--session-ttl", "600")
    assert out.startswith("llava-sessions deploy --dry-run: nothing changes. The plan:\n")
    assert f"image {IMAGE} is in ECR" in out and f"model data {DATA} exists" in out and "no endpoint chat yet" in out
    assert f"1. create the model {p.model_name}\n   aws sagemaker CreateModel ModelName={p.model_name}\n" in out
    assert f"Image={IMAGE}" in out and f"ModelDataSource={DATA} (S3Prefix" in out and f"ExecutionRoleArn={ROLE}" in out
    assert '"LLAVA_SESSIONS_SESSION_TTL_S": "600"' in out
    assert f"aws sagemaker CreateEndpointConfig EndpointConfigName={p.config_name}" in out
    assert f"InstanceType={TYPE} InitialInstanceCount=1" in out
    assert f"aws sagemaker CreateEndpoint EndpointName=chat EndpointConfigName={p.config_name}" in out
    assert "wait until endpoint chat is InService" in out
    assert f"aws application-autoscaling RegisterScalableTarget ResourceId={RESOURCE} MinCapacity=1 MaxCapacity=3" in out
    assert "aws application-autoscaling PutScalingPolicy PolicyName=llava-sessions-invocations-per-instance" in out
    assert "`llava-sessions teardown --name chat` removes them all" in out
    assert planned(out) == ["CreateModel", "CreateEndpointConfig", "CreateEndpoint", "RegisterScalableTarget",
                            "PutScalingPolicy"]
    assert changes(api_calls) == [], api_calls
    assert sm.list_endpoints()["Endpoints"] == [] and names(sm) == ([], [])
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []


def test_dry_run_shows_exactly_the_calls_the_run_makes(aws, api_calls, capsys):
    for argv in (deploy_argv("--autoscale-max", "3"), ["teardown", "--name", "chat", "--poll", "0"]):
        assert main([*argv, "--dry-run"]) == 0
        shown = planned(capsys.readouterr().out)
        assert shown, argv
        del api_calls[:]
        assert main(argv) == 0
        assert changes(api_calls) == shown, argv
        capsys.readouterr()
    assert main(["teardown", "--name", "chat", "--dry-run"]) == 0  # nothing left: a plan without calls
    assert capsys.readouterr().out.splitlines()[-1].startswith("nothing to tear down: no endpoint chat")


def test_update_dry_run_names_the_old_model_and_config_it_deletes(aws, api_calls, capsys):
    sm, _ = aws
    old = plan()
    assert main(deploy_argv()) == 0
    before = names(sm)
    new_image = IMAGE.replace("abc123", "v2")
    new = plan("--image", new_image)
    capsys.readouterr()
    del api_calls[:]
    assert main(["update", "--name", "chat", "--image", new_image, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("llava-sessions update --dry-run: nothing changes. The plan:\n")
    assert f"endpoint chat runs config {old.config_name} (InService)" in out
    assert f"aws sagemaker CreateModel ModelName={new.model_name}" in out and f"Image={new_image}" in out
    assert (f"aws sagemaker UpdateEndpoint EndpointName=chat EndpointConfigName={new.config_name} "
            "RetainAllVariantProperties=False") in out
    assert f"aws sagemaker DeleteEndpointConfig EndpointConfigName={old.config_name}" in out
    assert f"aws sagemaker DeleteModel ModelName={old.model_name}" in out
    assert (f"once endpoint chat runs {new.config_name}, this update deletes the old config {old.config_name}, "
            f"model {old.model_name}") in out
    assert planned(out) == ["CreateModel", "CreateEndpointConfig", "UpdateEndpoint", "DeleteEndpointConfig",
                            "DeleteModel"]
    assert changes(api_calls) == [] and names(sm) == before
    assert sm.describe_endpoint(EndpointName="chat")["EndpointConfigName"] == old.config_name


def test_teardown_names_what_it_deletes_and_its_dry_run_deletes_nothing(aws, api_calls, capsys):
    sm, autoscaling = aws
    p = plan("--autoscale-max", "3")
    assert main(deploy_argv("--autoscale-max", "3")) == 0
    capsys.readouterr()
    del api_calls[:]
    assert main(["teardown", "--name", "chat", "--dry-run"]) == 0
    out = capsys.readouterr().out
    deletes = (f"this teardown deletes: autoscaling of AllTraffic, endpoint chat, config {p.config_name}, "
               f"model {p.model_name}")
    assert out.startswith("llava-sessions teardown --dry-run: nothing changes. The plan:\n") and deletes in out
    assert planned(out) == ["DeleteScalingPolicy", "DeregisterScalableTarget", "DeleteEndpoint",
                            "DeleteEndpointConfig", "DeleteModel"]
    assert "aws sagemaker DeleteEndpoint EndpointName=chat" in out and "wait until endpoint chat is gone" in out
    assert changes(api_calls) == []
    assert len(sm.list_endpoints()["Endpoints"]) == 1 and names(sm) == ([p.model_name], [p.config_name])
    assert len(autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]) == 1

    assert main(["teardown", "--name", "chat", "--poll", "0"]) == 0
    err = capsys.readouterr().err
    assert err.index(deletes) < err.index("endpoint chat: gone")  # named before anything is deleted


# --- after a failure: what is left behind --------------------------------------------------------


def client_error(code, message="refused"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, "Operation")


def test_a_failed_create_endpoint_names_the_model_and_config_left_behind(aws, capsys):
    sm, autoscaling = aws
    p = plan()

    def refuse(**kwargs):
        raise client_error("ResourceLimitExceeded", "account-level service limit for ml.g4dn.xlarge is 0")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sm, "create_endpoint", refuse, raising=False)
        patch.setattr(endpoint_command, "lifecycle", lambda args: ep.Lifecycle(sm, autoscaling))
        assert main(deploy_argv()) == 1
    err = capsys.readouterr().err
    assert "llava-sessions: AWS refused" in err and "service limit" in err
    assert f"left behind by this run: model {p.model_name}, config {p.config_name}\n" in err
    assert "remove them with `llava-sessions teardown --name chat`" in err
    assert names(sm) == ([p.model_name], [p.config_name])

    assert main(["teardown", "--name", "chat", "--poll", "0"]) == 0  # what the message says removes them
    assert names(sm) == ([], [])


def test_an_endpoint_that_fails_names_everything_left_behind(aws):
    p = plan("--autoscale-max", "2")
    lc = life(aws)
    real_create = lc.sm.create_endpoint

    def create_then_fail(**kwargs):
        real_create(**kwargs)
        record = moto_endpoint()
        record.endpoint_status, record.failure_reason = "Failed", "CannotStartContainerError: ping failed"

    lc.sm.create_endpoint = create_then_fail
    with pytest.raises(ep.DeployError) as failure:
        lc.deploy(p)
    message = str(failure.value)
    assert "endpoint chat failed: CannotStartContainerError: ping failed" in message
    assert f"left behind by this run: model {p.model_name}, config {p.config_name}, endpoint chat\n" in message
    assert "`llava-sessions teardown --name chat`" in message
    assert "scal" not in message.split("left behind", 1)[1].splitlines()[0]  # autoscaling never got applied


def test_a_rolled_back_update_names_what_it_left_and_how_to_restore_autoscaling(aws):
    sm, autoscaling = aws
    old = plan("--autoscale-max", "3", "--autoscale-target", "15")
    life(aws).deploy(old)
    new = plan("--instance-type", "ml.g4dn.2xlarge", "--image", IMAGE.replace("abc123", "v2"), command="update")
    stub = StubbedUpdate(sm, [{"EndpointName": "chat", "EndpointConfigName": new.config_name,
                               "RetainAllVariantProperties": False}])

    def roll_back(seconds):
        record = moto_endpoint()
        record.endpoint_config_name, record.endpoint_status = old.config_name, "InService"
        record.failure_reason = "health check failed"

    lc = ep.Lifecycle(stub, autoscaling, out=io.StringIO(), err=io.StringIO(), sleep=roll_back)
    with pytest.raises(ep.DeployError) as failure:
        lc.update(new)
    message = str(failure.value)
    assert f"rolled back to {old.config_name}: health check failed" in message
    assert (f"left behind by this run: model {new.model_name}, config {new.config_name} "
            f"(endpoint chat still runs {old.config_name})") in message
    assert "the next `llava-sessions update --name chat` that succeeds deletes them" in message
    assert "`llava-sessions teardown --name chat` deletes them with the endpoint" in message
    assert ("autoscaling of chat was deregistered for the instance type change and is not registered again: "
            "`llava-sessions update --name chat --autoscale-min 1 --autoscale-max 3 --autoscale-target 15` "
            "registers it again") in message
    assert autoscaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert names(sm) == (sorted([old.model_name, new.model_name]), sorted([old.config_name, new.config_name]))


def test_update_names_the_old_model_and_config_before_it_starts(aws, monkeypatch, capsys):
    sm, autoscaling = aws
    old = plan()
    assert main(deploy_argv()) == 0
    new_image = IMAGE.replace("abc123", "def456")
    new = plan("--image", new_image)
    stub = StubbedUpdate(sm, [{"EndpointName": "chat", "EndpointConfigName": new.config_name,
                               "RetainAllVariantProperties": False}])

    def sleep(seconds):
        moto_endpoint().endpoint_status = "InService"

    monkeypatch.setattr(endpoint_command, "lifecycle", lambda args: ep.Lifecycle(stub, autoscaling, sleep=sleep))
    capsys.readouterr()
    assert main(["update", "--name", "chat", "--image", new_image]) == 0
    err = capsys.readouterr().err
    ahead = (f"once endpoint chat runs {new.config_name}, this update deletes the old config {old.config_name}, "
             f"model {old.model_name}")
    assert ahead in err and err.index(ahead) < err.index(f"created model {new.model_name}")


def test_an_update_that_fails_after_the_roll_says_what_is_left_to_do(aws):
    sm, autoscaling = aws
    old = plan()
    life(aws).deploy(old)
    new = plan("--instance-count", "2", command="update")
    stub = StubbedUpdate(sm, [{"EndpointName": "chat", "EndpointConfigName": new.config_name,
                               "RetainAllVariantProperties": False}])

    def sleep(seconds):
        moto_endpoint().endpoint_status = "InService"

    def refuse(**kwargs):
        raise client_error("ThrottlingException", "Rate exceeded")

    stub.delete_endpoint_config = refuse
    lc = ep.Lifecycle(stub, autoscaling, out=io.StringIO(), err=io.StringIO(), sleep=sleep)
    with pytest.raises(ep.DeployError) as failure:
        lc.update(new)
    message = str(failure.value)
    assert (f"endpoint chat runs {new.config_name} now; not done: delete the old endpoint config "
            f"{old.config_name}") in message
    assert "run the same `llava-sessions update --name chat` again to finish" in message

    del stub.delete_endpoint_config
    lc.update(new)  # as the message says: the same update again deletes the old config
    assert names(sm) == ([new.model_name], [new.config_name])  # one model: only the instance count changed


def test_a_teardown_that_fails_partway_says_what_is_not_deleted_yet(aws, capsys):
    sm, autoscaling = aws
    p = plan()
    assert main(deploy_argv()) == 0

    def refuse(**kwargs):
        raise client_error("ThrottlingException", "Rate exceeded")

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sm, "delete_endpoint_config", refuse, raising=False)
        patch.setattr(endpoint_command, "lifecycle", lambda args: ep.Lifecycle(sm, autoscaling))
        assert main(["teardown", "--name", "chat", "--poll", "0"]) == 1
    err = capsys.readouterr().err
    assert (f"not deleted yet: config {p.config_name}, model {p.model_name}; run "
            "`llava-sessions teardown --name chat` again to finish") in err
    assert main(["teardown", "--name", "chat", "--poll", "0"]) == 0
    assert names(sm) == ([], [])


# --- the image must be in ECR ----------------------------------------------------------------------


def test_image_must_be_a_pushed_ecr_image_in_the_endpoint_region(aws, api_calls, capsys):
    sm, _ = aws
    other_region = IMAGE.replace(REGION, "eu-west-1")
    push_image("abc123", region="eu-west-1")
    for image, message in [
        ("docker.io/library/nginx:latest", "is not an ECR image URI"),
        (f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com", "is not an ECR image URI"),
        (IMAGE.replace("abc123", "missing"), "not found in ECR: repository llava-sessions has no image with tag missing"),
        (IMAGE.replace("llava-sessions:", "other:"), "not found in ECR: account 123456789012 has no repository other"),
        (IMAGE.split(":abc123")[0] + "@sha256:" + "f" * 64, "not found in ECR"),
        (other_region, "is in eu-west-1, the endpoint would be in us-east-1"),
    ]:
        argv = deploy_argv()
        argv[argv.index(IMAGE)] = image
        assert main(argv) == 2, image
        err = capsys.readouterr().err
        assert message in err and "llava-sessions image push" in err, (image, err)
    assert main(["update", "--name", "chat", "--image", IMAGE.replace("abc123", "missing")]) == 2
    assert changes([c for c in api_calls if c not in ("CreateRepository", "PutImage")]) == []
    assert names(sm) == ([], [])

    # By digest, and the tag left out (docker's "latest").
    digest = push_image("latest")
    by_digest = IMAGE.split(":abc123")[0] + "@" + digest
    for image in (by_digest, IMAGE.split(":abc123")[0]):
        argv = deploy_argv("--dry-run")
        argv[argv.index(IMAGE)] = image
        assert main(argv) == 0, capsys.readouterr().err
        assert f"image {image} is in ECR" in capsys.readouterr().out


def test_image_check_warns_and_goes_on_when_ecr_will_not_say():
    class Refusing:
        def describe_images(self, **kwargs):
            raise client_error("AccessDeniedException", "not authorized to perform: ecr:DescribeImages")

    err = io.StringIO()
    assert ep.check_image_exists(Refusing(), IMAGE, REGION, err) == f"image {IMAGE} not checked (AccessDeniedException)"
    assert f"could not check {IMAGE} in ECR (AccessDeniedException); going on" in err.getvalue()
    assert ep.parse_ecr_image(f"{ACCOUNT}.dkr.ecr.cn-north-1.amazonaws.com.cn/team/llava:v1") == ep.EcrImage(
        ACCOUNT, "cn-north-1", "team/llava", "v1", None)


# --- --help ---------------------------------------------------------------------------------------

SPEC_OPTIONS = ("--image", "--model-data", "--instance-type", "--instance-count", "--role", "--memory-budget-gb",
                "--session-ttl", "--download-timeout", "--startup-timeout", "--routing")


def help_lines(monkeypatch, capsys, command):
    """``command --help``, one line per option (argparse's wrapped lines joined again)."""
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    blocks = re.split(r"\n(?=  -)", capsys.readouterr().out)
    options = {" ".join(block.split()).split(" ", 1)[0]: " ".join(block.split()) for block in blocks}
    return {option: options[option] for option in SPEC_OPTIONS}


def test_update_help_says_the_current_value_is_the_default_and_deploy_help_the_built_in(monkeypatch, capsys):
    for option, line in help_lines(monkeypatch, capsys, "update").items():
        assert re.findall(r"\(default:? ([^)]*)\)", line) == ["the endpoint's current value"], line
    deploy = help_lines(monkeypatch, capsys, "deploy")
    assert all("current value" not in line for line in deploy.values())
    for option, default in [("--instance-type", "ml.g5.2xlarge"), ("--instance-count", "1"),
                            ("--download-timeout", "1800"), ("--startup-timeout", "1800"),
                            ("--routing", "LEAST_OUTSTANDING_REQUESTS"), ("--memory-budget-gb", "automatic"),
                            ("--role", "$SAGEMAKER_ROLE_ARN")]:
        assert f"(default: {default}" in deploy[option], deploy[option]


def test_a_failure_on_an_endpoint_that_was_already_there_does_not_suggest_teardown(aws):
    sm, autoscaling = aws
    life(aws).deploy(plan())
    lc = life(aws)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autoscaling, "put_scaling_policy",
                      lambda **kwargs: (_ for _ in ()).throw(client_error("LimitExceededException")), raising=False)
        with pytest.raises(ep.DeployError) as failure:
            lc.deploy(plan("--autoscale-max", "3"))
    message = str(failure.value)
    assert "endpoint chat was there before this run and stays; not done: put the target-tracking scaling policy" in message
    assert "Run the same deploy again to finish" in message and "teardown" not in message
