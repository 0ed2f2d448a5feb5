"""`llava-sessions image build|push`: the plan, its dry run, and its run against moto's ECR."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest

from llava_sessions.cli import main
from llava_sessions.deploy import image
from llava_sessions.errors import ConfigError
from tests.fakes import isolate_from_aws

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account
REGISTRY = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
DLC = f"763104351884.dkr.ecr.{REGION}.amazonaws.com/pytorch-inference:2.6.0-gpu-py312-cu124-ubuntu22.04-sagemaker"
CHECKOUT = Path(__file__).resolve().parents[2]
REAL_SDK_LOOKUP = image._sdk_image_uris


@pytest.fixture(autouse=True)
def no_sagemaker_sdk(monkeypatch):
    """The built-in table names the base image unless a test installs a fake SDK."""
    monkeypatch.setattr(image, "_sdk_image_uris", lambda: None)


@pytest.fixture
def aws(monkeypatch):
    from moto import mock_aws

    isolate_from_aws(monkeypatch, REGION)
    with mock_aws():
        import boto3

        yield boto3.client("ecr", region_name=REGION)


@pytest.fixture
def no_subprocess(monkeypatch):
    """Any process started (docker, git) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0] if args else kwargs}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)


class FakeDocker:
    """Records each docker command the executor runs, and what it got on stdin."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[tuple[str, ...], str | None]] = []
        self.fail_on = fail_on

    def __call__(self, argv, stdin, hint):
        self.calls.append((tuple(argv), stdin))
        if self.fail_on and self.fail_on in argv:
            raise image.ImageError(f"{argv[1]} failed; {hint}")

    @property
    def argvs(self):
        return [argv for argv, _ in self.calls]


def expected_build_argv(base: str, refs: list[str], tag: str) -> tuple[str, ...]:
    argv = ["docker", "build", "--platform", "linux/amd64", "--provenance=false",
            "--file", str(CHECKOUT / "container" / "Dockerfile"), "--build-arg", f"BASE_IMAGE={base}",
            "--label", f"org.opencontainers.image.version={tag}"]
    for ref in refs:
        argv += ["--tag", ref]
    return tuple(argv + [str(CHECKOUT)])


def push_options(**overrides) -> image.Options:
    values = {"context": CHECKOUT, "base_image": DLC, "tag": "abc1234", "region": REGION, "registry": REGISTRY}
    values.update(overrides)
    return image.Options(**values)


# --- the plan ----------------------------------------------------------------------------------


def test_build_plan_logs_in_to_the_base_registry_then_builds_with_both_tags():
    steps = image.build_steps(image.Options(context=CHECKOUT, base_image=DLC, tag="abc1234"))
    assert [type(s).__name__ for s in steps] == ["Docker", "Login", "Docker"]
    assert steps[0].argv == ("docker", "version", "--format", "{{.Server.Version}}")
    assert steps[1].argv == ("docker", "login", "--username", "AWS", "--password-stdin",
                             f"763104351884.dkr.ecr.{REGION}.amazonaws.com")
    assert steps[2].argv == expected_build_argv(
        DLC, ["llava-sessions:abc1234", "llava-sessions:latest"], "abc1234")


def test_a_base_image_outside_ecr_needs_no_login():
    steps = image.build_steps(image.Options(context=CHECKOUT, base_image="pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime",
                                            tag="latest"))
    assert not any(isinstance(s, image.Login) for s in steps)
    assert steps[-1].argv.count("--tag") == 1 and "llava-sessions:latest" in steps[-1].argv


def test_push_plan_order():
    steps = image.push_steps(push_options())
    assert [s.why for s in steps] == [
        "check that the Docker engine answers",
        "the ECR repository, created when missing (idempotent)",
        "log in to the target registry",
        "log in to the base image's registry",
        "build the image, tagged abc1234 and latest",
        "push abc1234",
        "push latest",
    ]
    assert steps[4].argv == expected_build_argv(
        DLC, [f"{REGISTRY}/llava-sessions:abc1234", f"{REGISTRY}/llava-sessions:latest"], "abc1234")
    assert steps[-2].argv == ("docker", "push", f"{REGISTRY}/llava-sessions:abc1234")
    assert steps[-1].argv == ("docker", "push", f"{REGISTRY}/llava-sessions:latest")


def test_lifecycle_policy_expires_untagged_after_7_days_and_keeps_the_newest():
    rules = json.loads(image.lifecycle_policy(keep_images=5))["rules"]
    assert rules[0]["selection"] == {"tagStatus": "untagged", "countType": "sinceImagePushed",
                                     "countUnit": "days", "countNumber": 7}
    assert rules[1]["selection"] == {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": 5}
    # ECR wants the "any" rule evaluated last.
    assert rules[1]["rulePriority"] > rules[0]["rulePriority"]
    assert all(r["action"] == {"type": "expire"} for r in rules)


# --- the base image ----------------------------------------------------------------------------


def test_default_base_image_from_the_table():
    assert image.default_base_image(REGION) == DLC
    assert image.dlc_image("af-south-1").startswith("626614931356.dkr.ecr.af-south-1.amazonaws.com/")
    china = image.dlc_image("cn-north-1")
    assert china.startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/pytorch-inference:")
    assert image.ecr_registry_of(china) == ("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn", "cn-north-1")
    with pytest.raises(ConfigError, match="--base-image"):
        image.dlc_image("xx-nowhere-1")


def test_default_base_image_asks_the_sagemaker_sdk_when_installed(monkeypatch):
    asked = {}

    def retrieve(**kwargs):
        asked.update(kwargs)
        return "111122223333.dkr.ecr.eu-west-1.amazonaws.com/pytorch-inference:from-sdk"

    monkeypatch.setattr(image, "_sdk_image_uris", lambda: types.SimpleNamespace(retrieve=retrieve))
    assert image.default_base_image("eu-west-1").endswith(":from-sdk")
    assert asked == {"framework": "pytorch", "region": "eu-west-1", "version": "2.6.0", "py_version": "py312",
                     "instance_type": "ml.g5.2xlarge", "image_scope": "inference"}


def test_an_sdk_that_cannot_answer_falls_back_to_the_table(monkeypatch, capsys):
    def retrieve(**kwargs):
        raise ValueError("Unsupported pytorch version: 2.6.0")

    monkeypatch.setattr(image, "_sdk_image_uris", lambda: types.SimpleNamespace(retrieve=retrieve))
    assert image.default_base_image(REGION) == DLC
    assert "Unsupported pytorch version" in capsys.readouterr().err


def test_sdk_lookup_finds_image_uris_of_sdk_2_or_3(monkeypatch):
    def module(name, **attrs):
        return types.SimpleNamespace(__name__=name, **attrs)

    v2 = module("sagemaker.image_uris", retrieve=lambda **kw: "v2")
    v3 = module("sagemaker.core.image_uris", retrieve=lambda **kw: "v3")
    for name in ("sagemaker.image_uris", "sagemaker.core.image_uris"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails
    assert REAL_SDK_LOOKUP() is None
    monkeypatch.setitem(sys.modules, "sagemaker.core.image_uris", v3)
    assert REAL_SDK_LOOKUP() is v3
    monkeypatch.setitem(sys.modules, "sagemaker.image_uris", v2)
    assert REAL_SDK_LOOKUP() is v2


# --- dry run -------------------------------------------------------------------------------------


def test_build_dry_run_prints_the_plan_and_runs_nothing(capsys, no_subprocess):
    assert main(["image", "build", "--dry-run", "--region", REGION, "--tag", "abc1234",
                 "--context", str(CHECKOUT)]) == 0
    out = capsys.readouterr().out
    assert "nothing runs" in out
    assert f"$ {shlex.join(expected_build_argv(DLC, ['llava-sessions:abc1234', 'llava-sessions:latest'], 'abc1234'))}" in out
    assert f"$ docker login --username AWS --password-stdin 763104351884.dkr.ecr.{REGION}.amazonaws.com" in out
    assert "docker push" not in out


def test_push_dry_run_prints_the_aws_calls_and_commands_and_changes_nothing(aws, capsys, no_subprocess):
    assert main(["image", "push", "--dry-run", "--region", REGION, "--tag", "abc1234",
                 "--context", str(CHECKOUT)]) == 0
    out = capsys.readouterr().out
    for line in (
        "aws ecr DescribeRepositories repositoryNames=[llava-sessions]",
        "aws ecr CreateRepository repositoryName=llava-sessions imageScanningConfiguration={scanOnPush=true}",
        f"aws ecr PutLifecyclePolicy lifecyclePolicyText={image.lifecycle_policy()}",
        "aws ecr GetAuthorizationToken",
        f"$ docker login --username AWS --password-stdin {REGISTRY}   < the token's password on stdin (never shown)",
        f"$ {shlex.join(expected_build_argv(DLC, [f'{REGISTRY}/llava-sessions:abc1234', f'{REGISTRY}/llava-sessions:latest'], 'abc1234'))}",
        f"$ docker push {REGISTRY}/llava-sessions:abc1234",
        f"$ docker push {REGISTRY}/llava-sessions:latest",
    ):
        assert line in out, line
    assert aws.describe_repositories()["repositories"] == []


def test_dry_run_without_aws_credentials_names_the_account_as_a_placeholder(monkeypatch, capsys, no_subprocess):
    import botocore.exceptions

    class NoCredentials:
        def get_caller_identity(self):
            raise botocore.exceptions.NoCredentialsError()

    monkeypatch.setattr(image.aws, "client", lambda *a, **k: NoCredentials())
    assert main(["image", "push", "--dry-run", "--region", REGION, "--tag", "t", "--context", str(CHECKOUT)]) == 0
    assert "$ docker push '<account-id>.dkr.ecr.us-east-1.amazonaws.com/llava-sessions:t'" in capsys.readouterr().out


# --- running the plan ------------------------------------------------------------------------


def moto_password(ecr) -> str:
    token = ecr.get_authorization_token()["authorizationData"][0]["authorizationToken"]
    user, _, password = base64.b64decode(token).decode().partition(":")
    assert user == "AWS"
    return password


def test_push_creates_the_repository_logs_in_builds_and_pushes(aws, capsys):
    docker = FakeDocker()
    results = image.Executor(runner=docker).run(image.push_steps(push_options()))

    repo = aws.describe_repositories(repositoryNames=["llava-sessions"])["repositories"][0]
    assert repo["repositoryUri"] == f"{REGISTRY}/llava-sessions"
    assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
    assert repo["imageTagMutability"] == "MUTABLE"
    policy = aws.get_lifecycle_policy(repositoryName="llava-sessions")["lifecyclePolicyText"]
    assert json.loads(policy) == json.loads(image.lifecycle_policy())
    assert results[1] == f"created {REGISTRY}/llava-sessions, lifecycle policy set"

    password = moto_password(aws)
    assert docker.calls == [
        (("docker", "version", "--format", "{{.Server.Version}}"), None),
        (("docker", "login", "--username", "AWS", "--password-stdin", REGISTRY), password),
        (("docker", "login", "--username", "AWS", "--password-stdin",
          f"763104351884.dkr.ecr.{REGION}.amazonaws.com"), password),
        (expected_build_argv(DLC, [f"{REGISTRY}/llava-sessions:abc1234", f"{REGISTRY}/llava-sessions:latest"],
                             "abc1234"), None),
        (("docker", "push", f"{REGISTRY}/llava-sessions:abc1234"), None),
        (("docker", "push", f"{REGISTRY}/llava-sessions:latest"), None),
    ]
    out = capsys.readouterr().out
    assert "[7/7] push latest" in out
    assert password not in out


def test_a_second_push_changes_nothing_in_ecr(aws):
    image.Executor(runner=FakeDocker()).run(image.push_steps(push_options()))
    calls = []
    real_client = image.aws.client

    def recording_client(*args, **kwargs):
        client = real_client(*args, **kwargs)
        client.meta.events.register("before-call.ecr.*", lambda model, **kw: calls.append(model.name))
        return client

    results = image.Executor(runner=FakeDocker(), client=recording_client).run(image.push_steps(push_options()))
    assert results[1] == "already as wanted"
    assert calls == ["DescribeRepositories", "GetLifecyclePolicy", "GetAuthorizationToken"]
    assert len(aws.describe_repositories()["repositories"]) == 1


def test_an_existing_repository_gets_scan_on_push_and_the_policy(aws):
    aws.create_repository(repositoryName="llava-sessions", imageScanningConfiguration={"scanOnPush": False})
    _, changes = image.ensure_repository(aws, "llava-sessions", image.lifecycle_policy())
    assert changes == ["scan on push turned on", "lifecycle policy set"]
    repo = aws.describe_repositories(repositoryNames=["llava-sessions"])["repositories"][0]
    assert repo["imageScanningConfiguration"] == {"scanOnPush": True}
    # another policy (say --keep-images changed) is replaced
    _, changes = image.ensure_repository(aws, "llava-sessions", image.lifecycle_policy(keep_images=3))
    assert changes == ["lifecycle policy set"]


def test_immutable_tags_are_refused_before_anything_is_built(aws):
    aws.create_repository(repositoryName="llava-sessions", imageTagMutability="IMMUTABLE")
    docker = FakeDocker()
    with pytest.raises(ConfigError, match="immutable tags"):
        image.Executor(runner=docker).run(image.push_steps(push_options()))
    assert [argv[1] for argv in docker.argvs] == ["version"]


def test_a_failed_build_stops_before_pushing(aws):
    docker = FakeDocker(fail_on="build")
    with pytest.raises(image.ImageError, match="build failed"):
        image.Executor(runner=docker).run(image.push_steps(push_options()))
    assert not any(argv[1] == "push" for argv in docker.argvs)


def test_missing_docker_says_how_to_fix_it_before_touching_aws(aws, monkeypatch, capsys):
    monkeypatch.setattr(image.shutil, "which", lambda name: None)
    code = main(["image", "push", "--region", REGION, "--tag", "abc1234", "--context", str(CHECKOUT)])
    assert code == 2
    assert "docker not found on PATH. Install Docker" in capsys.readouterr().err
    assert aws.describe_repositories()["repositories"] == []


def test_run_command_streams_and_reports_failures(capfd):
    image.run_command([sys.executable, "-c", "print('progress 1/2')"], None, "")
    assert "progress 1/2" in capfd.readouterr().out  # not captured: it reaches the terminal
    image.run_command([sys.executable, "-c", "import sys; assert sys.stdin.read() == 's3cret'"], "s3cret", "")
    with pytest.raises(image.ImageError, match="exit status 3.*start it"):
        image.run_command([sys.executable, "-c", "raise SystemExit(3)"], None, "start it")
    with pytest.raises(ConfigError, match="docker not found"):
        image.run_command(["llava-sessions-no-such-docker"], None, "")


def test_authorization_token_decoding():
    token = base64.b64encode(b"AWS:pass:with:colons").decode()
    assert image.decode_authorization_token(token) == ("AWS", "pass:with:colons")
    with pytest.raises(image.ImageError):
        image.decode_authorization_token(base64.b64encode(b"no-separator").decode())


# --- options -------------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def test_default_tag_is_the_git_revision_marked_dirty_with_changes(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git(tmp_path, "add", "f.txt")
    git(tmp_path, "commit", "-q", "-m", "one")
    revision = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert image.git_revision(tmp_path) == revision
    (tmp_path / "untracked.txt").write_text("ignored")
    assert image.git_revision(tmp_path) == revision
    (tmp_path / "f.txt").write_text("b")
    assert image.git_revision(tmp_path) == f"{revision}-dirty"
    with pytest.raises(ConfigError, match="pass --tag"):
        image.git_revision(tmp_path / "not-a-repo")


@pytest.mark.parametrize("argv, message", [
    (["--tag", "bad tag"], "is not a docker tag"),
    (["--repository", "Upper"], "is not an ECR repository name"),
    (["--keep-images", "0"], "--keep-images"),
    (["--context", "/nonexistent"], "no container/Dockerfile under /nonexistent"),
])
def test_bad_options_say_how_to_fix_them(argv, message, capsys, no_subprocess):
    args = ["image", "build", "--dry-run", "--region", REGION, "--tag", "ok"] + argv
    assert main(args) == 2
    assert message in capsys.readouterr().err
