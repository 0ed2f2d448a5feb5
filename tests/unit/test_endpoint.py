"""deploy / update / teardown and autoscaling against moto's SageMaker and Application Auto Scaling.

moto 5 checks instance types against an old list that lacks ml.g5.* (the default), so the tests
deploy ml.g4dn.xlarge. moto has no update_endpoint: the update test sends that one call through
botocore's Stubber (which validates it against the real service model) and applies its effect to
moto's endpoint record, so everything around it (new model and config, waiting, pruning) is real.
"""

from __future__ import annotations

import io
import re

import pytest
from llava_sessions.deploy import endpoint as ep

from llava_sessions.cli import _parser, main
from llava_sessions.errors import ConfigError
from tests.fakes import isolate_from_aws

REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/llava-sagemaker"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/llava-sessions:abc123"
DATA = "s3://model-bucket/models/llava/"
TYPE = "ml.g4dn.xlarge"  # moto rejects ml.g5.*
RESOURCE = "endpoint/chat/variant/AllTraffic"


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
    lc._create_model(p)
    lc._create_config(p)
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

    monkeypatch.setattr(ep, "lifecycle", lambda args: ep.Lifecycle(stub, autoscaling, sleep=sleep))
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
