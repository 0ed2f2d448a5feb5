"""``llava-sessions image build | push``: the serving container, built and pushed to ECR. Torch-free.

Each command is first written down as a plan: a list of steps, each an AWS
call made through boto3 or a docker command line. ``--dry-run`` prints the
plan and runs nothing; otherwise the same plan runs step by step, docker's
own output streaming to the terminal. So what ``--dry-run`` shows is what
runs. The one thing never shown is the registry password: it comes from
ECR's authorization token when the step runs and reaches
``docker login --password-stdin`` on its stdin.

``push`` is idempotent: the ECR repository is created when missing, and
scan on push and the lifecycle policy (untagged images expire after 7 days,
the newest 20 images are kept) are applied to an existing one too; the image
is built (cached layers make a rebuild quick), tagged with the git revision
and ``latest``, and both tags pushed.

The default base image is the SageMaker PyTorch inference GPU image of the
region: named by the sagemaker SDK when it is installed, else built from the
table below.
"""

from __future__ import annotations

import base64
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from llava_sessions.deploy import aws
from llava_sessions.errors import ConfigError

DEFAULT_REPOSITORY = "llava-sessions"
DEFAULT_PLATFORM = "linux/amd64"  # SageMaker's GPU instances are x86-64
LATEST = "latest"
DOCKERFILE = Path("container") / "Dockerfile"
KEEP_IMAGES = 20
UNTAGGED_EXPIRY_DAYS = 7

# The SageMaker PyTorch inference GPU image (AWS Deep Learning Containers).
# Tag: aws/deep-learning-containers, docs/src/data/pytorch-inference/2.6-gpu-sagemaker.yml,
# the newest SageMaker PyTorch inference release (transformers 5 needs torch >= 2.6).
# Accounts: the same repository's docs/reference/region_availability.md ("Deep Learning
# Containers"); the sagemaker SDK's image_uri_config/pytorch.json lists the same ids.
DLC_REPOSITORY = "pytorch-inference"
DLC_VERSION = "2.6.0"
DLC_PY_VERSION = "py312"
DLC_TAG = f"{DLC_VERSION}-gpu-{DLC_PY_VERSION}-cu124-ubuntu22.04-sagemaker"
SDK_INSTANCE_TYPE = "ml.g5.2xlarge"  # any GPU type: makes the SDK pick the GPU image
DLC_ACCOUNTS = {
    "us-east-1": "763104351884",
    "us-east-2": "763104351884",
    "us-west-1": "763104351884",
    "us-west-2": "763104351884",
    "af-south-1": "626614931356",
    "ap-east-1": "871362719292",
    "ap-east-2": "975050140332",
    "ap-south-1": "763104351884",
    "ap-south-2": "772153158452",
    "ap-northeast-1": "763104351884",
    "ap-northeast-2": "763104351884",
    "ap-northeast-3": "364406365360",
    "ap-southeast-1": "763104351884",
    "ap-southeast-2": "763104351884",
    "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322",
    "ap-southeast-5": "550225433462",
    "ap-southeast-6": "633930458069",
    "ap-southeast-7": "590183813437",
    "ca-central-1": "763104351884",
    "ca-west-1": "204538143572",
    "eu-central-1": "763104351884",
    "eu-central-2": "380420809688",
    "eu-north-1": "763104351884",
    "eu-south-1": "692866216735",
    "eu-south-2": "503227376785",
    "eu-west-1": "763104351884",
    "eu-west-2": "763104351884",
    "eu-west-3": "763104351884",
    "il-central-1": "780543022126",
    "me-central-1": "914824155844",
    "me-south-1": "217643126080",
    "mx-central-1": "637423239942",
    "sa-east-1": "763104351884",
    "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807",
}

ECR_HOST = re.compile(r"^\d{12}\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?$")
# Docker's tag grammar and ECR's repository name grammar.
TAG_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
REPOSITORY_PATTERN = re.compile(r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*$")
ACCOUNT_PLACEHOLDER = "<account-id>"

DOCKER_MISSING = (
    "docker not found on PATH. Install Docker Engine (https://docs.docker.com/engine/install/) "
    "or Docker Desktop and run again; `--dry-run` prints the commands without docker"
)
ENGINE_HINT = (
    "the Docker engine did not answer: start it (e.g. `sudo systemctl start docker`), or point "
    "DOCKER_HOST at one, and check that your user may use it (`docker info`)"
)


class ImageError(Exception):
    """A docker or AWS step failed; the user must act (exit status 1)."""


def dns_suffix(region: str) -> str:
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def registry_host(account: str, region: str) -> str:
    return f"{account}.dkr.ecr.{region}.{dns_suffix(region)}"


# --- the base image ----------------------------------------------------------------------------


def default_base_image(region: str, *, warn: TextIO | None = None) -> str:
    """The SageMaker PyTorch inference GPU image for ``region``: the SDK's answer, else the table's."""
    image_uris = _sdk_image_uris()
    if image_uris is not None:
        try:
            return image_uris.retrieve(
                framework="pytorch", region=region, version=DLC_VERSION, py_version=DLC_PY_VERSION,
                instance_type=SDK_INSTANCE_TYPE, image_scope="inference",
            )
        except Exception as exc:  # noqa: BLE001 (the SDK raises ValueError and friends)
            print(f"llava-sessions: the sagemaker SDK could not name the base image ({exc}); "
                  "using the built-in table", file=warn or sys.stderr)
    return dlc_image(region)


def dlc_image(region: str) -> str:
    account = DLC_ACCOUNTS.get(region)
    if account is None:
        raise ConfigError(
            f"no SageMaker PyTorch image is known for region {region!r}; pass --base-image "
            f"(any image with Python >= 3.11 and PyTorch >= 2.6). Known regions: {', '.join(sorted(DLC_ACCOUNTS))}"
        )
    return f"{registry_host(account, region)}/{DLC_REPOSITORY}:{DLC_TAG}"


def _sdk_image_uris():
    """The sagemaker SDK's image_uris module when it is installed (it is optional and heavy)."""
    for name in ("sagemaker.image_uris", "sagemaker.core.image_uris"):  # SDK 2.x, 3.x
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001, S112 (missing, or an SDK that fails at import without config)
            continue
        if callable(getattr(module, "retrieve", None)):
            return module
    return None


def ecr_registry_of(image: str) -> tuple[str, str] | None:
    """(registry host, region) when ``image`` lives in a private ECR registry, else None."""
    host = image.split("/", 1)[0] if "/" in image else ""
    match = ECR_HOST.match(host)
    return (host, match["region"]) if match else None


# --- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Docker:
    """One docker command line."""

    argv: tuple[str, ...]
    why: str
    hint: str = ""  # what to tell the user when it fails

    def lines(self) -> list[str]:
        return [f"$ {shlex.join(self.argv)}"]

    def execute(self, ex: Executor) -> str:
        ex.runner(self.argv, None, self.hint)
        return ""


@dataclass(frozen=True)
class Login:
    """``docker login`` to an ECR registry with the password from an ECR authorization token."""

    registry: str
    region: str
    why: str

    @property
    def argv(self) -> tuple[str, ...]:
        return ("docker", "login", "--username", "AWS", "--password-stdin", self.registry)

    def lines(self) -> list[str]:
        return [f"aws ecr GetAuthorizationToken (region {self.region})",
                f"$ {shlex.join(self.argv)}   < the token's password on stdin (never shown)"]

    def execute(self, ex: Executor) -> str:
        user, password = ex.token(self.region)
        if user != "AWS":
            raise ImageError(f"ECR authorization token for user {user!r}, expected 'AWS'")
        ex.runner(self.argv, password, "")
        return ""


@dataclass(frozen=True)
class EnsureRepository:
    """The ECR repository exists, scans on push, and carries the lifecycle policy."""

    name: str
    region: str
    uri: str  # what the plan's tags use; checked against ECR's answer
    lifecycle_policy: str
    why: str = "the ECR repository, created when missing (idempotent)"

    def lines(self) -> list[str]:
        return [
            f"aws ecr DescribeRepositories repositoryNames=[{self.name}] (region {self.region})",
            (f"    when missing: aws ecr CreateRepository repositoryName={self.name} "
             "imageScanningConfiguration={scanOnPush=true} imageTagMutability=MUTABLE"),
            "    when scan on push is off: aws ecr PutImageScanningConfiguration scanOnPush=true",
            f"aws ecr GetLifecyclePolicy repositoryName={self.name}",
            f"    when it differs: aws ecr PutLifecyclePolicy lifecyclePolicyText={self.lifecycle_policy}",
        ]

    def execute(self, ex: Executor) -> str:
        repo, changes = ensure_repository(ex.ecr(self.region), self.name, self.lifecycle_policy)
        if ACCOUNT_PLACEHOLDER not in self.uri and repo["repositoryUri"] != self.uri:
            raise ImageError(f"ECR names the repository {repo['repositoryUri']}, the plan expected {self.uri}")
        return ", ".join(changes) or "already as wanted"


Step = Docker | Login | EnsureRepository


@dataclass(frozen=True)
class Options:
    context: Path
    base_image: str
    tag: str
    repository: str = DEFAULT_REPOSITORY
    platform: str = DEFAULT_PLATFORM
    region: str | None = None  # where to push (push only)
    registry: str | None = None  # <account>.dkr.ecr.<region>.amazonaws.com (push only)
    keep_images: int = KEEP_IMAGES

    @property
    def tags(self) -> list[str]:
        return [self.tag] if self.tag == LATEST else [self.tag, LATEST]

    def image_refs(self) -> list[str]:
        name = f"{self.registry}/{self.repository}" if self.registry else self.repository
        return [f"{name}:{tag}" for tag in self.tags]


def lifecycle_policy(keep_images: int = KEEP_IMAGES, untagged_days: int = UNTAGGED_EXPIRY_DAYS) -> str:
    """ECR lifecycle policy: untagged images expire after ``untagged_days``, at most ``keep_images`` stay.

    The "any" rule must come last (highest rulePriority); ``latest`` always
    sits on the newest push, so it is never the one expired.
    """
    return json.dumps({"rules": [
        {"rulePriority": 1, "description": f"untagged images expire after {untagged_days} days",
         "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed",
                       "countUnit": "days", "countNumber": untagged_days},
         "action": {"type": "expire"}},
        {"rulePriority": 2, "description": f"keep the {keep_images} newest images",
         "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep_images},
         "action": {"type": "expire"}},
    ]}, separators=(",", ":"))


def build_steps(opts: Options) -> list[Step]:
    """Check the engine, log in to the base image's registry if it is ECR, build with every tag."""
    steps: list[Step] = [Docker(("docker", "version", "--format", "{{.Server.Version}}"),
                                "check that the Docker engine answers", ENGINE_HINT)]
    base_registry = ecr_registry_of(opts.base_image)
    if base_registry is not None:
        host, region = base_registry
        steps.append(Login(host, region, "log in to the base image's registry"))
    argv = [
        "docker", "build",
        "--platform", opts.platform,
        # A single-platform image with a Docker manifest: SageMaker refuses OCI
        # indexes, which BuildKit's default provenance attestation produces
        # (aws/amazon-sagemaker-feedback#180).
        "--provenance=false",
        "--file", str(opts.context / DOCKERFILE),
        "--build-arg", f"BASE_IMAGE={opts.base_image}",
        "--label", f"org.opencontainers.image.version={opts.tag}",
    ]
    for ref in opts.image_refs():
        argv += ["--tag", ref]
    argv.append(str(opts.context))
    steps.append(Docker(tuple(argv), f"build the image, tagged {' and '.join(opts.tags)}"))
    return steps


def push_steps(opts: Options) -> list[Step]:
    """The ECR repository, the login to it, the build, then one push per tag."""
    if not (opts.region and opts.registry):
        raise ConfigError("push needs the target region and registry")
    uri = f"{opts.registry}/{opts.repository}"
    steps: list[Step] = build_steps(opts)
    steps.insert(1, EnsureRepository(opts.repository, opts.region, uri, lifecycle_policy(opts.keep_images)))
    if not any(isinstance(s, Login) and s.registry == opts.registry for s in steps):
        steps.insert(2, Login(opts.registry, opts.region, "log in to the target registry"))
    steps += [Docker(("docker", "push", ref), f"push {ref.rsplit(':', 1)[1]}") for ref in opts.image_refs()]
    return steps


def format_plan(steps: Sequence[Step]) -> str:
    out = []
    for i, step in enumerate(steps, 1):
        out.append(f"{i}. {step.why}")
        out += [f"   {line}" for line in step.lines()]
    return "\n".join(out)


# --- running it --------------------------------------------------------------------------------


Runner = Callable[[Sequence[str], str | None, str], None]  # (argv, stdin, hint on failure)


def run_command(argv: Sequence[str], stdin: str | None, hint: str) -> None:
    """Run one docker command, its output streaming to ours (build and push progress)."""
    try:
        proc = subprocess.run(list(argv), input=stdin, text=True, check=False)
    except FileNotFoundError:
        raise ConfigError(DOCKER_MISSING) from None
    if proc.returncode != 0:
        raise ImageError(f"`{shlex.join(argv)}` failed (exit status {proc.returncode}); "
                         f"{hint or 'its output is above'}")


def decode_authorization_token(token: str) -> tuple[str, str]:
    """ECR's authorizationToken is base64 of ``user:password``."""
    user, sep, password = base64.b64decode(token).decode().partition(":")
    if not sep:
        raise ImageError("ECR returned an authorization token that is not user:password")
    return user, password


@dataclass
class Executor:
    profile: str | None = None
    runner: Runner = run_command
    client: Callable[..., Any] = aws.client
    out: TextIO | None = None  # default: sys.stdout at the time of the run
    _clients: dict[str, Any] = field(default_factory=dict)
    _tokens: dict[str, tuple[str, str]] = field(default_factory=dict)

    def ecr(self, region: str):
        if region not in self._clients:
            self._clients[region] = self.client("ecr", region, self.profile)
        return self._clients[region]

    def token(self, region: str) -> tuple[str, str]:
        if region not in self._tokens:
            data = self.ecr(region).get_authorization_token()["authorizationData"][0]
            self._tokens[region] = decode_authorization_token(data["authorizationToken"])
        return self._tokens[region]

    def run(self, steps: Sequence[Step]) -> list[str]:
        if any(isinstance(s, (Docker, Login)) for s in steps) and shutil.which("docker") is None \
                and self.runner is run_command:
            raise ConfigError(DOCKER_MISSING)  # before any AWS change
        out = self.out or sys.stdout
        results = []
        for i, step in enumerate(steps, 1):
            print(f"[{i}/{len(steps)}] {step.why}", file=out, flush=True)
            for line in step.lines():
                if line.startswith("$"):
                    print(f"      {line}", file=out, flush=True)
            result = step.execute(self)
            if result:
                print(f"      {result}", file=out, flush=True)
            results.append(result)
        return results


def ensure_repository(ecr, name: str, policy: str) -> tuple[dict[str, Any], list[str]]:
    """Create or fix up the repository; (its description, what changed)."""
    from botocore.exceptions import ClientError

    changes = []
    try:
        repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "RepositoryNotFoundException":
            raise
        repo = ecr.create_repository(
            repositoryName=name, imageScanningConfiguration={"scanOnPush": True}, imageTagMutability="MUTABLE",
        )["repository"]
        changes.append(f"created {repo['repositoryUri']}")
    else:
        if repo.get("imageTagMutability", "MUTABLE") != "MUTABLE":
            raise ConfigError(
                f"ECR repository {name} has immutable tags, so `{LATEST}` cannot move to a new image: "
                "make its tags mutable or pass another --repository"
            )
        if not repo.get("imageScanningConfiguration", {}).get("scanOnPush"):
            ecr.put_image_scanning_configuration(repositoryName=name,
                                                 imageScanningConfiguration={"scanOnPush": True})
            changes.append("scan on push turned on")
    try:
        current = ecr.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"]
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "LifecyclePolicyNotFoundException":
            raise
        current = None
    if current is None or json.loads(current) != json.loads(policy):
        ecr.put_lifecycle_policy(repositoryName=name, lifecyclePolicyText=policy)
        changes.append("lifecycle policy set")
    return repo, changes


# --- options to plan ---------------------------------------------------------------------------


def find_context(explicit: Path | None) -> Path:
    """The build context: the checkout holding container/Dockerfile."""
    here = Path(__file__).resolve().parent.parent  # deploy/ -> the checkout, in a source tree
    candidates = [explicit] if explicit else [here, Path.cwd()]
    for candidate in candidates:
        if (candidate / DOCKERFILE).is_file():
            return candidate.resolve()
    where = explicit or Path.cwd()
    raise ConfigError(f"no {DOCKERFILE} under {where}: run from a llava-sessions checkout or pass --context")


def git_revision(context: Path) -> str:
    """The checkout's short commit id, with -dirty when tracked files have uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(context), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        revision = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        raise ConfigError(f"cannot read the git revision of {context}; pass --tag") from None
    return f"{revision}-dirty" if dirty else revision


def check_names(repository: str, tag: str) -> None:
    if not (2 <= len(repository) <= 256 and REPOSITORY_PATTERN.match(repository)):
        raise ConfigError(f"--repository {repository!r} is not an ECR repository name "
                          "(lower-case letters, digits, . _ - and / between parts)")
    if not TAG_PATTERN.match(tag):
        raise ConfigError(f"--tag {tag!r} is not a docker tag (letters, digits, _ . -; at most 128)")


def account_id(region: str, profile: str | None, *, dry_run: bool) -> str:
    """The caller's AWS account (names the registry); a placeholder in a dry run without credentials."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return aws.client("sts", region, profile).get_caller_identity()["Account"]
    except (BotoCoreError, ClientError) as exc:
        if not dry_run:
            raise ImageError(f"cannot read your AWS account ({exc}); configure credentials "
                             "(`aws configure`, AWS_PROFILE) and run again") from None
        return ACCOUNT_PLACEHOLDER


def options_from_args(args, *, push: bool) -> Options:
    context = find_context(args.context)
    tag = args.tag or git_revision(context)
    check_names(args.repository, tag)
    if args.keep_images < 1:
        raise ConfigError("--keep-images must be at least 1")
    region = None
    if push or not args.base_image:
        region = aws.session(args.region, args.profile).region_name
    base = args.base_image or default_base_image(region)
    registry = None
    if push:
        registry = registry_host(account_id(region, args.profile, dry_run=args.dry_run), region)
    return Options(context=context, base_image=base, tag=tag, repository=args.repository,
                   platform=args.platform, region=region, registry=registry, keep_images=args.keep_images)


# --- the commands ------------------------------------------------------------------------------


__all__ = [
    "DLC_ACCOUNTS",
    "Docker",
    "EnsureRepository",
    "Executor",
    "ImageError",
    "Login",
    "Options",
    "build_steps",
    "default_base_image",
    "dlc_image",
    "ensure_repository",
    "format_plan",
    "lifecycle_policy",
    "push_steps",
]
