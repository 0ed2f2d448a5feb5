"""``llava-sessions deploy | update | teardown``: a SageMaker real-time endpoint's whole life.

Naming: the endpoint keeps the name the user gives it. Its Model and
EndpointConfig are named after it plus a short hash of their own content,
``<name>-model-<8 hex>`` and ``<name>-config-<8 hex>``. Identical inputs give
identical names, which is what makes ``deploy`` idempotent, and new inputs
give new names, so ``update`` builds the next Model and config beside the
ones in service, rolls the endpoint to them, then deletes the old pair.

Each command is first worked out as Steps, with read-only calls only (describe
and list): the list of AWS calls that change something, each with its
arguments, and the waits between them. ``--dry-run`` prints the Steps; the
real run makes exactly those calls in order. When one fails, the error names
what the run created and left behind, and the command that removes it.

The container's environment (read by the container entrypoint and by
``ServingConfig``, which takes ``LLAVA_SESSIONS_<FIELD>`` overrides):

* nothing for TorchServe itself: the container's serve command always turns
  token auth off (SageMaker calls the container without a token) and keeps the
  management and metrics APIs on loopback; the per-response timeout (per chunk
  when streaming) is the archive's ``responseTimeout`` (model-config.yaml, 600 s).
* ``LLAVA_SESSIONS_MEMORY_BUDGET_BYTES`` (from ``--memory-budget-gb``) and
  ``LLAVA_SESSIONS_SESSION_TTL_S`` (from ``--session-ttl``), only when given;
  otherwise the archive's model-config.yaml decides.
* anything passed with ``--env KEY=VALUE``.

Torch-free; boto3 is reached only through the clients handed in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from llava_sessions.deploy.progress import StatusTicker, human_seconds

from llava_sessions.errors import ConfigError

VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
POLICY_NAME = "llava-sessions-invocations-per-instance"
TAG_KEY = "llava-sessions:endpoint"

ENV_MEMORY_BUDGET = "LLAVA_SESSIONS_MEMORY_BUDGET_BYTES"
ENV_SESSION_TTL = "LLAVA_SESSIONS_SESSION_TTL_S"
ENV_ROLE = "SAGEMAKER_ROLE_ARN"

DEFAULTS = {
    "instance_type": "ml.g5.2xlarge",
    "instance_count": 1,
    # Large weights: up to an hour to copy them in and to load them (SageMaker's maximum).
    "download_timeout_s": 1800,
    "startup_timeout_s": 1800,
    "routing": "LEAST_OUTSTANDING_REQUESTS",
}
SAGEMAKER_TIMEOUT_MAX_S = 3600

HASH_LEN = 8
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")
MAX_ENDPOINT_NAME = 63 - len("-config-") - HASH_LEN  # so the config's name fits SageMaker's 63
IN_PROGRESS = {"Creating", "Updating", "SystemUpdating", "RollingBack", "UpdateRollbackFailed"}


class DeployError(Exception):
    """An AWS-side failure the user must act on (exit status 1)."""


# --- what to deploy ------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:HASH_LEN]


@dataclass(frozen=True)
class ModelSpec:
    image: str
    model_data: str  # s3://.../ (uncompressed prefix) or s3://.../model.tar.gz
    role: str
    environment: dict[str, str]

    def container(self) -> dict[str, Any]:
        container: dict[str, Any] = {"Image": self.image, "Environment": dict(sorted(self.environment.items()))}
        if self.model_data.endswith(".tar.gz"):
            container["ModelDataUrl"] = self.model_data
        else:
            container["ModelDataSource"] = {
                "S3DataSource": {"S3Uri": self.model_data, "S3DataType": "S3Prefix", "CompressionType": "None"}
            }
        return container


@dataclass(frozen=True)
class VariantSpec:
    instance_type: str
    instance_count: int
    download_timeout_s: int
    startup_timeout_s: int
    routing: str

    def production_variant(self, model_name: str) -> dict[str, Any]:
        return {
            "VariantName": VARIANT,
            "ModelName": model_name,
            "InstanceType": self.instance_type,
            "InitialInstanceCount": self.instance_count,
            "ModelDataDownloadTimeoutInSeconds": self.download_timeout_s,
            "ContainerStartupHealthCheckTimeoutInSeconds": self.startup_timeout_s,
            "RoutingConfig": {"RoutingStrategy": self.routing},
        }


@dataclass(frozen=True)
class AutoscaleSpec:
    min_capacity: int
    max_capacity: int
    target_invocations: float  # per instance per minute (SageMakerVariantInvocationsPerInstance)
    scale_in_cooldown_s: int = 600  # scale-in ends the sessions held by the removed instance
    scale_out_cooldown_s: int = 60

    def policy_configuration(self) -> dict[str, Any]:
        return {
            "TargetValue": float(self.target_invocations),
            "PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"},
            "ScaleInCooldown": self.scale_in_cooldown_s,
            "ScaleOutCooldown": self.scale_out_cooldown_s,
        }


@dataclass(frozen=True)
class Plan:
    endpoint: str
    model: ModelSpec
    variant: VariantSpec
    autoscale: AutoscaleSpec | None = None

    @property
    def model_name(self) -> str:
        return f"{self.endpoint}-model-{_digest(asdict(self.model))}"

    @property
    def config_name(self) -> str:
        return f"{self.endpoint}-config-{_digest([self.model_name, asdict(self.variant)])}"

    def endpoint_config(self) -> dict[str, Any]:
        return {
            "EndpointConfigName": self.config_name,
            "ProductionVariants": [self.variant.production_variant(self.model_name)],
            "Tags": _tags(self.endpoint),
        }


def _tags(endpoint: str) -> list[dict[str, str]]:
    return [{"Key": TAG_KEY, "Value": endpoint}]


def check_endpoint_name(name: str) -> str:
    if not NAME_PATTERN.match(name) or len(name) > MAX_ENDPOINT_NAME:
        raise ConfigError(
            f"endpoint name {name!r}: use letters, digits and '-', at most {MAX_ENDPOINT_NAME} characters "
            "(its model and config names add a suffix)"
        )
    return name


def check_model_data(uri: str) -> str:
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise ConfigError(f"--model-data must be an s3:// URI, got {uri!r}")
    if not uri.endswith(("/", ".tar.gz")):
        raise ConfigError(
            f"--model-data {uri!r}: end an uncompressed prefix with '/' (what `upload` prints), "
            "or name a .tar.gz object"
        )
    return uri


def container_environment(*, memory_budget_gb: float | None = None,
                          session_ttl_s: int | None = None, extra: dict[str, str] | None = None,
                          base: dict[str, str] | None = None) -> dict[str, str]:
    """The Model's Environment (see the module docstring); ``base`` is the current one on update."""
    env = dict(base or {})
    if memory_budget_gb is not None:
        if memory_budget_gb < 0:
            raise ConfigError("--memory-budget-gb must be >= 0 (0 = automatic)")
        env[ENV_MEMORY_BUDGET] = str(int(memory_budget_gb * (1 << 30)))
    if session_ttl_s is not None:
        if session_ttl_s <= 0:
            raise ConfigError("--session-ttl must be positive")
        env[ENV_SESSION_TTL] = str(int(session_ttl_s))
    env.update(extra or {})
    return env


def resolve_role(role: str | None, environ=os.environ) -> str:
    """--role, else $SAGEMAKER_ROLE_ARN, else the sagemaker SDK's execution role when it is installed."""
    reason = "the sagemaker SDK is not installed"
    if not role:
        role = environ.get(ENV_ROLE)
    if not role:
        try:
            import sagemaker  # optional, heavy; never a requirement
        except ImportError:
            sagemaker = None
        getter = getattr(sagemaker, "get_execution_role", None)
        if getter is not None:
            try:
                role = getter()
            except Exception as exc:  # noqa: BLE001 (outside SageMaker Studio/notebooks it raises)
                reason = f"sagemaker.get_execution_role() failed: {exc}"
    if not role:
        raise ConfigError(
            "no SageMaker execution role: pass --role arn:aws:iam::<account>:role/<name> or set "
            f"{ENV_ROLE} (the role SageMaker assumes to pull the image from ECR and read the model "
            f"from S3; {reason})"
        )
    if not (role.startswith("arn:") and ":role/" in role):
        raise ConfigError(f"--role must be an IAM role ARN (arn:aws:iam::<account>:role/<name>), got {role!r}")
    return role


# --- AWS side ----------------------------------------------------------------------------------


def _missing(exc) -> bool:
    error = exc.response.get("Error", {})
    message = error.get("Message", "")
    return error.get("Code") in ("ValidationException", "ResourceNotFound") and (
        "Could not find" in message or "does not exist" in message or "No scalable target" in message
    )


# --- the plan: every call that changes something, worked out before the first one -------------


def _api_name(operation: str) -> str:
    """boto3's method name -> the API's: create_endpoint_config -> CreateEndpointConfig."""
    return "".join(part.capitalize() for part in operation.split("_"))


@dataclass
class Call:
    """One AWS call that changes something, with the arguments it will be made with.

    ``creates`` and ``removes`` name the resource it brings into being or deletes
    ("model chat-model-1a2b3c4d"): what a run says it will delete, and what it
    says it left behind when a later step fails.
    """

    service: str  # "sagemaker" or "application-autoscaling": the client that makes it
    operation: str  # that client's method, e.g. "create_model"
    params: dict[str, Any]
    why: str
    shown: tuple[str, ...] = ()  # the key arguments, "Key=value", a line each, for the plan
    creates: str = ""
    removes: str = ""
    done: str = ""  # said (stderr) once it succeeded

    def lines(self) -> list[str]:
        head, *rest = self.shown or ("",)
        return [f"aws {self.service} {_api_name(self.operation)} {head}".rstrip()] + [f"    {line}" for line in rest]


@dataclass
class Wait:
    """Poll describe_endpoint (read-only) until the endpoint is InService, or gone."""

    endpoint: str
    until: str  # "InService" or "gone"
    why: str
    config: str | None = None  # InService on this config, else the update was rolled back

    def lines(self) -> list[str]:
        goal = "it is gone" if self.until == "gone" else "InService" + (f" on {self.config}" if self.config else "")
        return [f"aws sagemaker DescribeEndpoint EndpointName={self.endpoint}   (read-only, repeated until {goal})"]


Step = Call | Wait


@dataclass
class Steps:
    """What a deploy, update or teardown will do, worked out with read-only calls only.

    ``--dry-run`` prints it (``format``); the real run makes its calls in order
    (``Lifecycle.run``), so what the dry run shows is what runs.
    """

    command: str  # "deploy", "update" or "teardown"
    endpoint: str
    steps: list[Step] = field(default_factory=list)
    found: list[str] = field(default_factory=list)  # what the look-ups found (said before the run)
    ahead: list[str] = field(default_factory=list)  # what the run will create or delete (said before it)
    done: list[str] = field(default_factory=list)  # said (stdout) once every step ran
    running: str = ""  # update: the endpoint config in service before the run
    restore: str = ""  # update: the options that register lifted autoscaling again

    def calls(self) -> list[Call]:
        return [s for s in self.steps if isinstance(s, Call)]

    def format(self) -> str:
        """The dry run's report, laid out as ``image push --dry-run``'s."""
        from llava_sessions.deploy.image import format_plan

        lines = [f"llava-sessions {self.command} --dry-run: nothing changes. The plan:"]
        if self.found:
            lines.append(f"(read-only look-ups made for it: {'; '.join(self.found)})")
        if self.steps:
            lines.append(format_plan(self.steps))
            lines += self.ahead
        else:
            lines += self.done[:1] or ["nothing to do"]
        return "\n".join(lines)

    def left_behind(self, ran: int) -> str:
        """The first ``ran`` steps succeeded and the next one failed: what this run left, and how to remove it."""
        done, pending = self.steps[:ran], [s for s in self.steps[ran:] if isinstance(s, Call)]
        made = [s.creates for s in done if isinstance(s, Call) and s.creates]
        name = self.endpoint
        teardown = f"`llava-sessions teardown --name {name}`"
        lines = []
        if self.command == "deploy":
            creates_endpoint = any(s.operation == "create_endpoint" for s in self.calls())
            if made and creates_endpoint:
                lines.append(f"left behind by this run: {', '.join(made)}")
                lines.append(f"remove them with {teardown}, or fix the cause and run the same deploy again "
                             "(it reuses them)")
            elif pending and not creates_endpoint:  # the endpoint was there before: keep it
                lines.append(f"endpoint {name} was there before this run and stays; not done: {'; '.join(s.why for s in pending)}. "
                             "Run the same deploy again to finish")
        elif self.command == "update":
            switched = next((s.config for s in done if isinstance(s, Wait) and s.config), None)
            if switched:
                lines.append(f"endpoint {name} runs {switched} now; not done: {'; '.join(s.why for s in pending)}")
                lines.append(f"run the same `llava-sessions update --name {name}` again to finish "
                             "(it deletes the old configs and models)")
            elif made:
                lines.append(f"left behind by this run: {', '.join(made)} (endpoint {name} still runs {self.running})")
                lines.append(f"the next `llava-sessions update --name {name}` that succeeds deletes them (it deletes "
                             f"every config and model of {name} that the endpoint does not run); {teardown} "
                             "deletes them with the endpoint")
            ops = [s.operation for s in done if isinstance(s, Call)]
            if "deregister_scalable_target" in ops and "register_scalable_target" not in ops:
                lines.append(f"autoscaling of {name} was deregistered for the instance type change and is not "
                             f"registered again: {self.restore}")
        else:
            left = list(dict.fromkeys(s.removes for s in pending if s.removes))
            if left:
                lines.append(f"not deleted yet: {', '.join(left)}; run {teardown} again to finish")
        return "\n".join(lines)


def _model_call(plan: Plan) -> Call:
    container = plan.model.container()
    data = (f"ModelDataUrl={plan.model.model_data}" if "ModelDataUrl" in container
            else f"ModelDataSource={plan.model.model_data} (S3Prefix, CompressionType None)")
    shown = [f"ModelName={plan.model_name}", f"Image={plan.model.image}", data,
             f"ExecutionRoleArn={plan.model.role}"]
    if plan.model.environment:
        shown.append(f"Environment={json.dumps(container['Environment'])}")
    return Call("sagemaker", "create_model",
                {"ModelName": plan.model_name, "PrimaryContainer": container,
                 "ExecutionRoleArn": plan.model.role, "Tags": _tags(plan.endpoint)},
                why=f"create the model {plan.model_name}", shown=tuple(shown),
                creates=f"model {plan.model_name}", done=f"created model {plan.model_name}")


def _config_call(plan: Plan) -> Call:
    v = plan.variant
    shown = (f"EndpointConfigName={plan.config_name}",
             f"VariantName={VARIANT} ModelName={plan.model_name}",
             f"InstanceType={v.instance_type} InitialInstanceCount={v.instance_count}",
             f"RoutingStrategy={v.routing}",
             f"ModelDataDownloadTimeoutInSeconds={v.download_timeout_s} "
             f"ContainerStartupHealthCheckTimeoutInSeconds={v.startup_timeout_s}")
    return Call("sagemaker", "create_endpoint_config", plan.endpoint_config(),
                why=f"create the endpoint config {plan.config_name}", shown=shown,
                creates=f"config {plan.config_name}", done=f"created endpoint config {plan.config_name}")


def _delete_call(kind: str, name: str, why: str) -> Call:
    operation, key = {"endpoint": ("delete_endpoint", "EndpointName"),
                      "config": ("delete_endpoint_config", "EndpointConfigName"),
                      "model": ("delete_model", "ModelName")}[kind]
    return Call("sagemaker", operation, {key: name}, why=why, shown=(f"{key}={name}",), removes=f"{kind} {name}")


def _autoscaling_hint(endpoint: str, target: dict, policies: list[dict]) -> str:
    """The update options that register ``target`` and its (our) policy again."""
    options = f"--autoscale-min {target['MinCapacity']} --autoscale-max {target['MaxCapacity']}"
    ours = next((p for p in policies if p["PolicyName"] == POLICY_NAME), None)
    value = (ours or {}).get("TargetTrackingScalingPolicyConfiguration", {}).get("TargetValue")
    if value is not None:
        options += f" --autoscale-target {value:g}"
    return f"`llava-sessions update --name {endpoint} {options}` registers it again"


@dataclass
class Lifecycle:
    """deploy / update / teardown over a sagemaker and an application-autoscaling client.

    ``plan_deploy`` / ``plan_update`` / ``plan_teardown`` make read-only calls
    only and return the Steps; ``run`` makes them. ``deploy`` / ``update`` /
    ``teardown`` do both.
    """

    sm: Any
    autoscaling: Any
    out: Any = field(default_factory=lambda: sys.stdout)
    err: Any = field(default_factory=lambda: sys.stderr)
    poll_s: float = 30.0
    timeout_s: float = 3600.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    # -- describe, None when missing --

    def _describe(self, call, **kwargs) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return call(**kwargs)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def endpoint(self, name: str) -> dict | None:
        return self._describe(self.sm.describe_endpoint, EndpointName=name)

    def endpoint_config(self, name: str) -> dict | None:
        return self._describe(self.sm.describe_endpoint_config, EndpointConfigName=name)

    def model(self, name: str) -> dict | None:
        return self._describe(self.sm.describe_model, ModelName=name)

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # -- the three commands --

    def deploy(self, plan: Plan, *, wait: bool = True) -> None:
        self.run(self.plan_deploy(plan, wait=wait))

    def update(self, plan: Plan, *, wait: bool = True) -> None:
        self.run(self.plan_update(plan, wait=wait))

    def teardown(self, name: str, *, keep_model: bool = False, wait: bool = True) -> None:
        self.run(self.plan_teardown(name, keep_model=keep_model, wait=wait))

    # -- running the steps --

    def run(self, steps: Steps) -> None:
        """Make the steps' calls in order. When one fails, the error names what this run left behind."""
        from botocore.exceptions import BotoCoreError, ClientError

        for line in steps.found + steps.ahead:
            self.note(line)
        ran = 0
        try:
            for step in steps.steps:
                if isinstance(step, Wait):
                    self._wait_for(step)
                else:
                    client = self.sm if step.service == "sagemaker" else self.autoscaling
                    getattr(client, step.operation)(**step.params)
                    if step.done:
                        self.note(step.done)
                ran += 1
        except (DeployError, ClientError, BotoCoreError) as exc:
            report = steps.left_behind(ran)
            if not report:
                raise
            text = str(exc) if isinstance(exc, DeployError) else f"AWS refused: {exc}"
            raise DeployError(f"{text}\n{report}") from exc
        except KeyboardInterrupt:
            report = steps.left_behind(ran)
            if report:
                self.note(f"interrupted. {report}")
            raise
        for line in steps.done:
            self.say(line)

    def _wait_for(self, step: Wait) -> None:
        after = self.wait(step.endpoint, step.until) or {}
        if step.config and after.get("EndpointConfigName") != step.config:
            raise DeployError(
                f"the update of {step.endpoint} was rolled back to {after.get('EndpointConfigName')}: "
                f"{after.get('FailureReason', 'no reason given')}"
            )

    # -- deploy --

    def plan_deploy(self, plan: Plan, *, wait: bool = True) -> Steps:
        name = plan.endpoint
        steps = Steps("deploy", name)
        current = self.endpoint(name)
        if current is None:
            steps.found.append(f"no endpoint {name} yet")
            steps.steps += self._model_and_config(plan, steps)
            v = plan.variant
            steps.steps.append(Call(
                "sagemaker", "create_endpoint",
                {"EndpointName": name, "EndpointConfigName": plan.config_name, "Tags": _tags(name)},
                why=f"create the endpoint {name}", shown=(f"EndpointName={name} EndpointConfigName={plan.config_name}",),
                creates=f"endpoint {name}",
                done=f"creating endpoint {name} ({v.instance_count} x {v.instance_type}); "
                     "this usually takes 5-15 minutes"))
            self._then(plan, wait, steps, "created")
            steps.ahead.append(f"this deploy creates: {', '.join(c.creates for c in steps.calls() if c.creates)}; "
                               f"`llava-sessions teardown --name {name}` removes them all")
            return steps
        if current["EndpointConfigName"] != plan.config_name:
            raise ConfigError(
                f"endpoint {name} already exists with config {current['EndpointConfigName']}, "
                f"but these options make {plan.config_name} (another model, image or settings). Roll it "
                "over with `llava-sessions update` and the same options, or `teardown` it first"
            )
        status = current["EndpointStatus"]
        if status == "Failed":
            raise DeployError(
                f"endpoint {name} failed: {current.get('FailureReason', 'no reason given')}. "
                f"Fix the cause, run `llava-sessions teardown --name {name}` (it deletes the endpoint, "
                f"its config {current['EndpointConfigName']} and its model), then deploy again"
            )
        if status in IN_PROGRESS:
            steps.found.append(f"endpoint {name} with this config is already {status}")
            self._then(plan, wait, steps, "ready")
            return steps
        if status != "InService":
            raise DeployError(f"endpoint {name} is {status}; wait for it, or tear it down first")
        steps.found.append(f"endpoint {name} is InService with this config")
        if plan.autoscale:
            steps.steps += self._autoscaling_calls(name, plan.autoscale)
        steps.done.append(f"endpoint {name} already InService with this config; autoscaling updated" if steps.steps
                          else f"endpoint {name} already InService with this model and config: nothing to do")
        return steps

    def _then(self, plan: Plan, wait: bool, steps: Steps, verb: str) -> None:
        if not wait:
            steps.done.append(f"endpoint {plan.endpoint}: {verb} without waiting (model {plan.model_name}, "
                              f"config {plan.config_name}); run deploy again to wait for it"
                              + (" and to apply autoscaling" if plan.autoscale else ""))
            return
        steps.steps.append(Wait(plan.endpoint, "InService", f"wait until endpoint {plan.endpoint} is InService"))
        if plan.autoscale:
            steps.steps += self._autoscaling_calls(plan.endpoint, plan.autoscale)
        steps.done += [f"endpoint {plan.endpoint} is InService (model {plan.model_name}, config {plan.config_name})",
                       f"try it: llava-sessions chat --endpoint {plan.endpoint} --image picture.png"]

    def _model_and_config(self, plan: Plan, steps: Steps) -> list[Call]:
        calls = []
        if self.model(plan.model_name) is not None:
            steps.found.append(f"model {plan.model_name} exists: reused")
        else:
            calls.append(_model_call(plan))
        if self.endpoint_config(plan.config_name) is not None:
            steps.found.append(f"endpoint config {plan.config_name} exists: reused")
        else:
            calls.append(_config_call(plan))
        return calls

    # -- update --

    def plan_update(self, plan: Plan, *, wait: bool = True) -> Steps:
        name = plan.endpoint
        current = self.endpoint(name)
        if current is None:
            raise ConfigError(f"no endpoint {name}: create it with `llava-sessions deploy`")
        old_config_name = current["EndpointConfigName"]
        steps = Steps("update", name, running=old_config_name)
        steps.found.append(f"endpoint {name} runs config {old_config_name} ({current['EndpointStatus']})")
        prune = self._prune_calls(name, keep_config=plan.config_name, keep_models={plan.model_name})
        pruned = [c.removes for c in prune]
        if old_config_name == plan.config_name:
            if current["EndpointStatus"] in IN_PROGRESS and wait:
                steps.steps.append(Wait(name, "InService", f"wait until endpoint {name} is InService"))
            changes = self._autoscaling_calls(name, plan.autoscale) if plan.autoscale else []
            steps.steps += changes + prune
            if pruned:
                steps.ahead.append(f"this update deletes the unused {', '.join(pruned)}")
            steps.done.append(f"endpoint {name} already runs config {plan.config_name}: "
                              + ("autoscaling updated" if changes else "nothing to update")
                              + (f"; removed {len(pruned)} unused old resource(s)" if pruned else ""))
            return steps
        if current["EndpointStatus"] != "InService":
            raise DeployError(f"endpoint {name} is {current['EndpointStatus']}; only an InService "
                              "endpoint can be updated")
        old_config = self.endpoint_config(old_config_name) or {"ProductionVariants": []}
        old_types = {v.get("InstanceType") for v in old_config["ProductionVariants"]}
        type_changes = bool(old_types - {plan.variant.instance_type})

        steps.steps += self._model_and_config(plan, steps)
        # Autoscaling blocks an update that changes the instance type: lift it for the update.
        target, policies = self.autoscaling_state(name)
        lifted = bool(target) and type_changes
        if lifted:
            steps.ahead.append("autoscaling is registered and the instance type changes: it is deregistered for "
                               "the update" + ("" if plan.autoscale else " and registered again afterwards"))
            steps.steps += self._unregister_calls(name, VARIANT, target, policies, "autoscaling")
            steps.restore = _autoscaling_hint(name, target, policies)
        retain = bool(target) and not lifted  # keep the autoscaled instance count when the scalable target stays
        steps.steps.append(Call(
            "sagemaker", "update_endpoint",
            {"EndpointName": name, "EndpointConfigName": plan.config_name, "RetainAllVariantProperties": retain},
            why=f"roll endpoint {name} from {old_config_name} to {plan.config_name}",
            shown=(f"EndpointName={name} EndpointConfigName={plan.config_name} RetainAllVariantProperties={retain}",),
            done=f"updating endpoint {name}: {old_config_name} -> {plan.config_name}"))
        if not wait:
            steps.done.append(f"endpoint {name}: update started; run update again with the same options "
                              "to wait, re-apply autoscaling and delete the old "
                              + (", ".join(pruned) if pruned else "config and model"))
            return steps
        steps.steps.append(Wait(name, "InService", f"wait until endpoint {name} is InService on {plan.config_name}",
                                config=plan.config_name))
        if plan.autoscale:
            steps.steps += self._autoscaling_calls(name, plan.autoscale, (None, []) if lifted else (target, policies))
        elif lifted:
            steps.steps += self._restore_calls(name, target, policies)
        steps.steps += prune
        if pruned:
            steps.ahead.append(f"once endpoint {name} runs {plan.config_name}, this update deletes the old "
                               f"{', '.join(pruned)}")
        steps.done.append(f"endpoint {name} is InService on config {plan.config_name}"
                          + (f"; deleted the old {', '.join(pruned)}" if pruned else ""))
        return steps

    def _prune_calls(self, endpoint: str, *, keep_config: str | None, keep_models: set[str]) -> list[Call]:
        """Deletions of this endpoint's configs and models (by our naming) other than the kept ones."""
        calls = [_delete_call("config", n, f"delete the old endpoint config {n}")
                 for n in self._ours(endpoint, "config") if n != keep_config]
        calls += [_delete_call("model", n, f"delete the old model {n}")
                  for n in self._ours(endpoint, "model") if n not in keep_models]
        return calls

    def _ours(self, endpoint: str, kind: str) -> list[str]:
        pattern = re.compile(rf"^{re.escape(endpoint)}-{kind}-[0-9a-f]{{{HASH_LEN}}}$")
        if kind == "config":
            pages = self.sm.get_paginator("list_endpoint_configs").paginate(NameContains=f"{endpoint}-config-")
            names = [c["EndpointConfigName"] for page in pages for c in page["EndpointConfigs"]]
        else:
            pages = self.sm.get_paginator("list_models").paginate(NameContains=f"{endpoint}-model-")
            names = [m["ModelName"] for page in pages for m in page["Models"]]
        return sorted(n for n in names if pattern.match(n))

    # -- teardown --

    def plan_teardown(self, name: str, *, keep_model: bool = False, wait: bool = True) -> Steps:
        steps = Steps("teardown", name)
        current = self.endpoint(name)
        labels: list[str] = []
        configs: list[str] = []
        models: set[str] = set()
        if current is None:
            steps.found.append(f"no endpoint {name}")
        else:
            steps.found.append(f"endpoint {name} is {current['EndpointStatus']}")
            variants = [v["VariantName"] for v in current.get("ProductionVariants", [])] or [VARIANT]
            for variant in variants:
                target, policies = self.autoscaling_state(name, variant)
                calls = self._unregister_calls(name, variant, target, policies, f"autoscaling of {variant}")
                steps.steps += calls
                labels += [f"autoscaling of {variant}"] if calls else []
            configs.append(current["EndpointConfigName"])
            config = self.endpoint_config(current["EndpointConfigName"])
            if config:
                models.update(v["ModelName"] for v in config["ProductionVariants"])
            if current["EndpointStatus"] != "Deleting":
                steps.steps.append(_delete_call("endpoint", name, f"delete the endpoint {name}"))
            labels.append(f"endpoint {name}")
            if wait:
                steps.steps.append(Wait(name, "gone", f"wait until endpoint {name} is gone"))
        for config_name in dict.fromkeys(configs + self._ours(name, "config")):
            if self.endpoint_config(config_name) is not None:
                steps.steps.append(_delete_call("config", config_name, f"delete the endpoint config {config_name}"))
                labels.append(f"config {config_name}")
        if not keep_model:
            for model_name in sorted(models | set(self._ours(name, "model"))):
                if self.model(model_name) is not None:
                    steps.steps.append(_delete_call("model", model_name, f"delete the model {model_name}"))
                    labels.append(f"model {model_name}")
        if labels:
            steps.ahead.append(f"this teardown deletes: {', '.join(labels)}")
            steps.done.append(f"deleted {', '.join(labels)}")
        else:
            steps.done.append(f"nothing to tear down: no endpoint {name}, and none of its configs or models")
        return steps

    # -- autoscaling --

    def autoscaling_state(self, endpoint: str, variant: str = VARIANT) -> tuple[dict | None, list[dict]]:
        resource = _resource_id(endpoint, variant)
        targets = self.autoscaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[resource], ScalableDimension=SCALABLE_DIMENSION
        )["ScalableTargets"]
        policies = self.autoscaling.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION
        )["ScalingPolicies"]
        return (targets[0] if targets else None), policies

    def _autoscaling_calls(self, endpoint: str, spec: AutoscaleSpec,
                           state: tuple[dict | None, list[dict]] | None = None) -> list[Call]:
        """Register the target and put its policy, unless both already match (``state``, else looked up)."""
        target, policies = state if state is not None else self.autoscaling_state(endpoint)
        policy = next((p for p in policies if p["PolicyName"] == POLICY_NAME), None)
        want = spec.policy_configuration()
        if (
            target is not None
            and (target["MinCapacity"], target["MaxCapacity"]) == (spec.min_capacity, spec.max_capacity)
            and policy is not None
            and _same_policy(policy.get("TargetTrackingScalingPolicyConfiguration", {}), want)
        ):
            return []
        resource = _resource_id(endpoint, VARIANT)
        return [
            Call("application-autoscaling", "register_scalable_target",
                 {"ServiceNamespace": "sagemaker", "ResourceId": resource, "ScalableDimension": SCALABLE_DIMENSION,
                  "MinCapacity": spec.min_capacity, "MaxCapacity": spec.max_capacity},
                 why=f"register {resource} for autoscaling, {spec.min_capacity}-{spec.max_capacity} instances",
                 shown=(f"ResourceId={resource} MinCapacity={spec.min_capacity} MaxCapacity={spec.max_capacity}",),
                 creates="" if target else f"scalable target {resource}"),
            Call("application-autoscaling", "put_scaling_policy",
                 {"PolicyName": POLICY_NAME, "ServiceNamespace": "sagemaker", "ResourceId": resource,
                  "ScalableDimension": SCALABLE_DIMENSION, "PolicyType": "TargetTrackingScaling",
                  "TargetTrackingScalingPolicyConfiguration": want},
                 why=f"put the target-tracking scaling policy {POLICY_NAME}",
                 shown=(f"PolicyName={POLICY_NAME} ResourceId={resource} PolicyType=TargetTrackingScaling",
                        f"TargetValue={want['TargetValue']:g} (SageMakerVariantInvocationsPerInstance) "
                        f"ScaleInCooldown={want['ScaleInCooldown']} ScaleOutCooldown={want['ScaleOutCooldown']}"),
                 creates="" if policy else f"scaling policy {POLICY_NAME}",
                 done=f"autoscaling {endpoint}: {spec.min_capacity}-{spec.max_capacity} instances, target "
                      f"{spec.target_invocations:g} invocations per instance per minute"),
        ]

    def _unregister_calls(self, endpoint: str, variant: str, target: dict | None, policies: list[dict],
                          label: str) -> list[Call]:
        """Delete the variant's scaling policies and deregister it; none when nothing is registered."""
        resource = _resource_id(endpoint, variant)
        calls = [
            Call("application-autoscaling", "delete_scaling_policy",
                 {"PolicyName": p["PolicyName"], "ServiceNamespace": "sagemaker", "ResourceId": resource,
                  "ScalableDimension": SCALABLE_DIMENSION},
                 why=f"delete the scaling policy {p['PolicyName']} of {resource}",
                 shown=(f"PolicyName={p['PolicyName']} ResourceId={resource}",), removes=label)
            for p in policies
        ]
        if target is not None:
            calls.append(Call("application-autoscaling", "deregister_scalable_target",
                              {"ServiceNamespace": "sagemaker", "ResourceId": resource,
                               "ScalableDimension": SCALABLE_DIMENSION},
                              why=f"deregister {resource} from autoscaling", shown=(f"ResourceId={resource}",),
                              removes=label))
        return calls

    def _restore_calls(self, endpoint: str, target: dict, policies: list[dict]) -> list[Call]:
        """Register ``target`` and put ``policies`` again, as they were before the update lifted them."""
        resource = _resource_id(endpoint, VARIANT)
        calls = [Call("application-autoscaling", "register_scalable_target",
                      {"ServiceNamespace": "sagemaker", "ResourceId": resource, "ScalableDimension": SCALABLE_DIMENSION,
                       "MinCapacity": target["MinCapacity"], "MaxCapacity": target["MaxCapacity"]},
                      why=f"register {resource} for autoscaling again, as before the update",
                      shown=(f"ResourceId={resource} MinCapacity={target['MinCapacity']} "
                             f"MaxCapacity={target['MaxCapacity']}",),
                      done=f"autoscaling of {endpoint} registered again "
                           f"({target['MinCapacity']}-{target['MaxCapacity']})")]
        for policy in policies:
            kwargs = {k: policy[k] for k in ("TargetTrackingScalingPolicyConfiguration",
                                             "StepScalingPolicyConfiguration") if k in policy}
            calls.append(Call("application-autoscaling", "put_scaling_policy",
                              {"PolicyName": policy["PolicyName"], "ServiceNamespace": "sagemaker",
                               "ResourceId": resource, "ScalableDimension": SCALABLE_DIMENSION,
                               "PolicyType": policy["PolicyType"], **kwargs},
                              why=f"put the scaling policy {policy['PolicyName']} again",
                              shown=(f"PolicyName={policy['PolicyName']} ResourceId={resource} "
                                     f"PolicyType={policy['PolicyType']}",)))
        return calls

    # -- waiting --

    def wait(self, name: str, until: str) -> dict | None:
        """Poll describe_endpoint until InService (or gone), Failed, or ``timeout_s``."""
        label = f"endpoint {name}"
        ticker = StatusTicker(label, stream=self.err, clock=self.clock)
        deadline = self.clock() + self.timeout_s
        while True:
            current = self.endpoint(name)
            status = current["EndpointStatus"] if current else "gone"
            ticker.tick(status)
            if (until == "gone" and current is None) or (until == status == "InService"):
                ticker.close()
                return current
            if status == "Failed" or (current is None and until != "gone"):
                ticker.close()
                reason = (current or {}).get("FailureReason", "the endpoint disappeared")
                raise DeployError(
                    f"endpoint {name} {status.lower()}: {reason}. See its CloudWatch logs under "
                    f"/aws/sagemaker/Endpoints/{name}; `llava-sessions teardown --name {name}` cleans up"
                )
            if self.clock() >= deadline:
                ticker.close()
                raise DeployError(
                    f"gave up waiting after {human_seconds(self.timeout_s)}: endpoint {name} is still "
                    f"{status}. It carries on in AWS; run the same command again to keep waiting"
                )
            self.sleep(self.poll_s)


def _resource_id(endpoint: str, variant: str) -> str:
    return f"endpoint/{endpoint}/variant/{variant}"


def _same_policy(have: dict, want: dict) -> bool:
    keys = ("TargetValue", "ScaleInCooldown", "ScaleOutCooldown")
    return all(have.get(k) == want.get(k) for k in keys) and (
        have.get("PredefinedMetricSpecification", {}).get("PredefinedMetricType")
        == want["PredefinedMetricSpecification"]["PredefinedMetricType"]
    )


# --- plans from the command line ---------------------------------------------------------------


def plan_from_args(args, current: dict | None = None, environ=os.environ) -> Plan:
    """The Plan the options describe. ``current`` (update) fills in what the options leave out:
    {"model": describe_model, "variant": the config's production variant}."""
    name = check_endpoint_name(args.name)
    model_now = (current or {}).get("model") or {}
    container_now = model_now.get("PrimaryContainer", {})
    variant_now = (current or {}).get("variant") or {}

    def pick(value, now, key):
        """The option if given, else the endpoint's current value (update), else the default."""
        if value is not None:
            return value
        return now if now is not None else DEFAULTS[key]

    image = args.image or container_now.get("Image")
    if not image:
        raise ConfigError("--image is required: the ECR image URI `llava-sessions image push` printed")
    if args.image:
        parse_ecr_image(args.image)
    model_data = args.model_data or _model_data_of(container_now)
    if not model_data:
        raise ConfigError("--model-data is required: the s3:// URI `llava-sessions upload` printed")
    role = args.role or (None if current is None else model_now.get("ExecutionRoleArn"))
    env_now = container_now.get("Environment")
    environment = container_environment(
        memory_budget_gb=args.memory_budget_gb,
        session_ttl_s=args.session_ttl,
        extra=_parse_env(args.env or []),
        base=env_now,
    )
    model = ModelSpec(image=image, model_data=check_model_data(model_data),
                      role=resolve_role(role, environ), environment=environment)
    variant = VariantSpec(
        instance_type=pick(args.instance_type, variant_now.get("InstanceType"), "instance_type"),
        instance_count=pick(args.instance_count, variant_now.get("InitialInstanceCount"), "instance_count"),
        download_timeout_s=pick(args.download_timeout, variant_now.get("ModelDataDownloadTimeoutInSeconds"),
                                "download_timeout_s"),
        startup_timeout_s=pick(args.startup_timeout,
                               variant_now.get("ContainerStartupHealthCheckTimeoutInSeconds"),
                               "startup_timeout_s"),
        routing=pick(args.routing, variant_now.get("RoutingConfig", {}).get("RoutingStrategy"), "routing"),
    )
    _check_variant(variant)
    return Plan(name, model, variant, _autoscale_from_args(args, variant.instance_count))


def _model_data_of(container: dict) -> str | None:
    return container.get("ModelDataUrl") or container.get("ModelDataSource", {}).get("S3DataSource", {}).get("S3Uri")


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise ConfigError(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def _check_variant(variant: VariantSpec) -> None:
    if not variant.instance_type.startswith("ml."):
        raise ConfigError(f"--instance-type must be a SageMaker type such as ml.g5.2xlarge, got {variant.instance_type!r}")
    if variant.instance_count < 1:
        raise ConfigError("--instance-count must be at least 1")
    for flag, value in (("--download-timeout", variant.download_timeout_s),
                        ("--startup-timeout", variant.startup_timeout_s)):
        if not 60 <= value <= SAGEMAKER_TIMEOUT_MAX_S:
            raise ConfigError(f"{flag} must be between 60 and {SAGEMAKER_TIMEOUT_MAX_S} seconds")


def _autoscale_from_args(args, instance_count: int) -> AutoscaleSpec | None:
    if args.autoscale_max is None:
        if args.autoscale_min is not None or args.autoscale_target is not None:
            raise ConfigError("autoscaling needs --autoscale-max (and optionally --autoscale-min, --autoscale-target)")
        return None
    low = args.autoscale_min if args.autoscale_min is not None else instance_count
    target = args.autoscale_target if args.autoscale_target is not None else 30.0
    if not 1 <= low <= args.autoscale_max:
        raise ConfigError("need 1 <= --autoscale-min <= --autoscale-max")
    if target <= 0:
        raise ConfigError("--autoscale-target must be positive (invocations per instance per minute)")
    return AutoscaleSpec(low, args.autoscale_max, float(target))


# --- the commands ----------------------------------------------------------------------------


def check_model_data_exists(s3, uri: str, err=None) -> str:
    """Refuse a --model-data with nothing behind it before SageMaker spends minutes finding out.

    Returns what it found, for a dry run to show."""
    from botocore.exceptions import ClientError
    from llava_sessions.deploy.artifacts import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    try:
        if uri.endswith(".tar.gz"):
            s3.head_object(Bucket=bucket, Key=key)
            return f"model data {uri} exists"
        found = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            print(f"could not check {uri} ({code or exc}); going on", file=err or sys.stderr)
            return f"model data {uri} not checked ({code or exc})"
        found = 0
    if not found:
        raise ConfigError(f"nothing at {uri}: run `llava-sessions upload` first and pass the URI it prints")
    return f"model data {uri} exists"


# <account>.dkr.ecr.<region>.amazonaws.com[.cn]/<repository>[:tag][@sha256:<digest>], ECR's and Docker's grammar.
ECR_IMAGE = re.compile(
    r"^(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(?:\.cn)?/"
    r"(?P<repository>(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True)
class EcrImage:
    account: str
    region: str
    repository: str
    tag: str | None = None
    digest: str | None = None  # wins over the tag, as with docker pull

    @property
    def image_id(self) -> dict[str, str]:
        return {"imageDigest": self.digest} if self.digest else {"imageTag": self.tag or "latest"}

    @property
    def reference(self) -> str:
        return f"digest {self.digest}" if self.digest else f"tag {self.tag or 'latest'}"


def parse_ecr_image(uri: str) -> EcrImage:
    match = ECR_IMAGE.match(uri)
    if not match:
        raise ConfigError(
            f"--image {uri!r} is not an ECR image URI "
            "(<account>.dkr.ecr.<region>.amazonaws.com/<repository>[:tag|@sha256:<digest>]): run "
            "`llava-sessions image push --region <region>` and pass the URI it prints"
        )
    return EcrImage(**match.groupdict())


def check_image_exists(ecr, uri: str, region: str, err=None) -> str:
    """Refuse an --image that is not in ECR, in the endpoint's region, before anything is created.

    ``ecr`` is an ECR client in ``region``; only describe_images is called. An answer other than
    "not found" (AccessDenied: the image may be in another account) is a warning. Returns what
    it found, for a dry run to show."""
    from botocore.exceptions import ClientError

    image = parse_ecr_image(uri)
    push = f"`llava-sessions image push --region {region}`"
    if image.region != region:
        raise ConfigError(
            f"--image {uri} is in {image.region}, the endpoint would be in {region}, and SageMaker pulls "
            f"images from the endpoint's region only: run {push} and pass the URI it prints"
        )
    try:
        ecr.describe_images(registryId=image.account, repositoryName=image.repository,
                            imageIds=[image.image_id])
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "RepositoryNotFoundException":
            raise ConfigError(
                f"--image {uri} not found in ECR: account {image.account} has no repository "
                f"{image.repository} in {region}. Run {push} and pass the URI it prints"
            ) from None
        if code == "ImageNotFoundException":
            raise ConfigError(
                f"--image {uri} not found in ECR: repository {image.repository} has no image with "
                f"{image.reference}. Run {push} and pass the URI it prints"
            ) from None
        print(f"could not check {uri} in ECR ({code or exc}); going on", file=err or sys.stderr)
        return f"image {uri} not checked ({code or exc})"
    return f"image {uri} is in ECR"


__all__ = [
    "AutoscaleSpec",
    "Call",
    "DeployError",
    "EcrImage",
    "Lifecycle",
    "ModelSpec",
    "Plan",
    "Steps",
    "VariantSpec",
    "Wait",
    "check_image_exists",
    "check_model_data_exists",
    "container_environment",
    "parse_ecr_image",
    "plan_from_args",
    "resolve_role",
]
