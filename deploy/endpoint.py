"""``llava-sessions deploy | update | teardown``: a SageMaker real-time endpoint's whole life.

Naming: the endpoint keeps the name the user gives it. Its Model and
EndpointConfig are named after it plus a short hash of their own content,
``<name>-model-<8 hex>`` and ``<name>-config-<8 hex>``. Identical inputs give
identical names, which is what makes ``deploy`` idempotent, and new inputs
give new names, so ``update`` builds the next Model and config beside the
ones in service, rolls the endpoint to them, then deletes the old pair.

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

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from llava_sessions.deploy import aws
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


@dataclass
class Lifecycle:
    """deploy / update / teardown over a sagemaker and an application-autoscaling client."""

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

    # -- deploy --

    def deploy(self, plan: Plan, *, wait: bool = True) -> None:
        current = self.endpoint(plan.endpoint)
        if current is None:
            self._create_model(plan)
            self._create_config(plan)
            self.sm.create_endpoint(EndpointName=plan.endpoint, EndpointConfigName=plan.config_name,
                                    Tags=_tags(plan.endpoint))
            self.note(f"creating endpoint {plan.endpoint} ({plan.variant.instance_count} x "
                      f"{plan.variant.instance_type}); this usually takes 5-15 minutes")
            self._finish(plan, wait, "created")
            return
        if current["EndpointConfigName"] != plan.config_name:
            raise ConfigError(
                f"endpoint {plan.endpoint} already exists with config {current['EndpointConfigName']}, "
                f"but these options make {plan.config_name} (another model, image or settings). Roll it "
                "over with `llava-sessions update` and the same options, or `teardown` it first"
            )
        status = current["EndpointStatus"]
        if status == "Failed":
            raise DeployError(
                f"endpoint {plan.endpoint} failed: {current.get('FailureReason', 'no reason given')}. "
                f"Fix the cause, run `llava-sessions teardown --name {plan.endpoint}`, then deploy again"
            )
        if status in IN_PROGRESS:
            self.note(f"endpoint {plan.endpoint} with this config is already {status}")
            self._finish(plan, wait, "ready")
            return
        if status != "InService":
            raise DeployError(f"endpoint {plan.endpoint} is {status}; wait for it, or tear it down first")
        if plan.autoscale and self.apply_autoscaling(plan.endpoint, plan.autoscale):
            self.say(f"endpoint {plan.endpoint} already InService with this config; autoscaling updated")
        else:
            self.say(f"endpoint {plan.endpoint} already InService with this model and config: nothing to do")

    def _finish(self, plan: Plan, wait: bool, verb: str) -> None:
        if not wait:
            self.say(f"endpoint {plan.endpoint}: {verb} without waiting (model {plan.model_name}, "
                     f"config {plan.config_name}); run deploy again to wait for it"
                     + (" and to apply autoscaling" if plan.autoscale else ""))
            return
        self.wait(plan.endpoint, "InService")
        if plan.autoscale:
            self.apply_autoscaling(plan.endpoint, plan.autoscale)
        self.say(f"endpoint {plan.endpoint} is InService (model {plan.model_name}, config {plan.config_name})")
        self.say(f"try it: llava-sessions chat --endpoint {plan.endpoint} --image picture.png")

    def _create_model(self, plan: Plan) -> None:
        if self.model(plan.model_name) is not None:
            self.note(f"model {plan.model_name} exists")
            return
        self.sm.create_model(ModelName=plan.model_name, PrimaryContainer=plan.model.container(),
                             ExecutionRoleArn=plan.model.role, Tags=_tags(plan.endpoint))
        self.note(f"created model {plan.model_name}")

    def _create_config(self, plan: Plan) -> None:
        if self.endpoint_config(plan.config_name) is not None:
            self.note(f"endpoint config {plan.config_name} exists")
            return
        self.sm.create_endpoint_config(**plan.endpoint_config())
        self.note(f"created endpoint config {plan.config_name}")

    # -- update --

    def update(self, plan: Plan, *, wait: bool = True) -> None:
        current = self.endpoint(plan.endpoint)
        if current is None:
            raise ConfigError(f"no endpoint {plan.endpoint}: create it with `llava-sessions deploy`")
        old_config_name = current["EndpointConfigName"]
        if old_config_name == plan.config_name:
            if current["EndpointStatus"] in IN_PROGRESS and wait:
                self.wait(plan.endpoint, "InService")
            changed = bool(plan.autoscale) and self.apply_autoscaling(plan.endpoint, plan.autoscale)
            pruned = self.prune(plan.endpoint, keep_config=plan.config_name, keep_models={plan.model_name})
            self.say(f"endpoint {plan.endpoint} already runs config {plan.config_name}: "
                     + ("autoscaling updated" if changed else "nothing to update")
                     + (f"; removed {len(pruned)} unused old resource(s)" if pruned else ""))
            return
        if current["EndpointStatus"] != "InService":
            raise DeployError(f"endpoint {plan.endpoint} is {current['EndpointStatus']}; only an InService "
                              "endpoint can be updated")
        old_config = self.endpoint_config(old_config_name) or {"ProductionVariants": []}
        old_types = {v.get("InstanceType") for v in old_config["ProductionVariants"]}
        type_changes = bool(old_types - {plan.variant.instance_type})

        self._create_model(plan)
        self._create_config(plan)
        # Autoscaling blocks an update that changes the instance type: lift it for the update.
        target, policies = self.autoscaling_state(plan.endpoint)
        lifted = bool(target) and type_changes
        if lifted:
            self.note("autoscaling is registered and the instance type changes: deregistering it for the update")
            self.remove_autoscaling(plan.endpoint)
        self.sm.update_endpoint(EndpointName=plan.endpoint, EndpointConfigName=plan.config_name,
                                # keep the autoscaled instance count when the scalable target stays
                                RetainAllVariantProperties=bool(target) and not lifted)
        self.note(f"updating endpoint {plan.endpoint}: {old_config_name} -> {plan.config_name}")
        if not wait:
            self.say(f"endpoint {plan.endpoint}: update started; run update again with the same options "
                     "to wait, re-apply autoscaling and delete the old config and model")
            return
        self.wait(plan.endpoint, "InService")
        after = self.endpoint(plan.endpoint) or {}
        if after.get("EndpointConfigName") != plan.config_name:
            raise DeployError(
                f"the update of {plan.endpoint} was rolled back to {after.get('EndpointConfigName')}: "
                f"{after.get('FailureReason', 'no reason given')}"
            )
        if plan.autoscale:
            self.apply_autoscaling(plan.endpoint, plan.autoscale)
        elif lifted:
            self._restore_autoscaling(plan.endpoint, target, policies)
        pruned = self.prune(plan.endpoint, keep_config=plan.config_name, keep_models={plan.model_name})
        self.say(f"endpoint {plan.endpoint} is InService on config {plan.config_name}"
                 + (f"; deleted the old {', '.join(pruned)}" if pruned else ""))

    def prune(self, endpoint: str, *, keep_config: str | None, keep_models: set[str]) -> list[str]:
        """Delete this endpoint's configs and models (by our naming) other than the kept ones."""
        deleted = []
        for name in self._ours(endpoint, "config"):
            if name != keep_config:
                self.sm.delete_endpoint_config(EndpointConfigName=name)
                deleted.append(f"config {name}")
        for name in self._ours(endpoint, "model"):
            if name not in keep_models:
                self.sm.delete_model(ModelName=name)
                deleted.append(f"model {name}")
        return deleted

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

    def teardown(self, name: str, *, keep_model: bool = False, wait: bool = True) -> None:
        current = self.endpoint(name)
        removed: list[str] = []
        configs: list[str] = []
        models: set[str] = set()
        if current is not None:
            variants = [v["VariantName"] for v in current.get("ProductionVariants", [])] or [VARIANT]
            for variant in variants:
                if self.remove_autoscaling(name, variant):
                    removed.append(f"autoscaling of {variant}")
            configs.append(current["EndpointConfigName"])
            config = self.endpoint_config(current["EndpointConfigName"])
            if config:
                models.update(v["ModelName"] for v in config["ProductionVariants"])
            if current["EndpointStatus"] != "Deleting":
                self.sm.delete_endpoint(EndpointName=name)
            removed.append(f"endpoint {name}")
            if wait:
                self.wait(name, "gone")
        for config_name in dict.fromkeys(configs + self._ours(name, "config")):
            if self.endpoint_config(config_name) is not None:
                self.sm.delete_endpoint_config(EndpointConfigName=config_name)
                removed.append(f"config {config_name}")
        if not keep_model:
            for model_name in sorted(models | set(self._ours(name, "model"))):
                if self.model(model_name) is not None:
                    self.sm.delete_model(ModelName=model_name)
                    removed.append(f"model {model_name}")
        if removed:
            self.say(f"deleted {', '.join(removed)}")
        else:
            self.say(f"nothing to tear down: no endpoint {name}, and none of its configs or models")

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

    def apply_autoscaling(self, endpoint: str, spec: AutoscaleSpec) -> bool:
        """Register the target and its policy unless both already match; True when something changed."""
        target, policies = self.autoscaling_state(endpoint)
        policy = next((p for p in policies if p["PolicyName"] == POLICY_NAME), None)
        want = spec.policy_configuration()
        if (
            target is not None
            and (target["MinCapacity"], target["MaxCapacity"]) == (spec.min_capacity, spec.max_capacity)
            and policy is not None
            and _same_policy(policy.get("TargetTrackingScalingPolicyConfiguration", {}), want)
        ):
            return False
        resource = _resource_id(endpoint, VARIANT)
        self.autoscaling.register_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
            MinCapacity=spec.min_capacity, MaxCapacity=spec.max_capacity,
        )
        self.autoscaling.put_scaling_policy(
            PolicyName=POLICY_NAME, ServiceNamespace="sagemaker", ResourceId=resource,
            ScalableDimension=SCALABLE_DIMENSION, PolicyType="TargetTrackingScaling",
            TargetTrackingScalingPolicyConfiguration=want,
        )
        self.note(f"autoscaling {endpoint}: {spec.min_capacity}-{spec.max_capacity} instances, target "
                  f"{spec.target_invocations:g} invocations per instance per minute")
        return True

    def remove_autoscaling(self, endpoint: str, variant: str = VARIANT) -> bool:
        """Delete the variant's scaling policies and deregister it; False when none was registered."""
        target, policies = self.autoscaling_state(endpoint, variant)
        resource = _resource_id(endpoint, variant)
        for policy in policies:
            self.autoscaling.delete_scaling_policy(
                PolicyName=policy["PolicyName"], ServiceNamespace="sagemaker", ResourceId=resource,
                ScalableDimension=SCALABLE_DIMENSION,
            )
        if target is None:
            return bool(policies)
        self.autoscaling.deregister_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION
        )
        return True

    def _restore_autoscaling(self, endpoint: str, target: dict, policies: list[dict]) -> None:
        resource = _resource_id(endpoint, VARIANT)
        self.autoscaling.register_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=resource, ScalableDimension=SCALABLE_DIMENSION,
            MinCapacity=target["MinCapacity"], MaxCapacity=target["MaxCapacity"],
        )
        for policy in policies:
            kwargs = {k: policy[k] for k in ("TargetTrackingScalingPolicyConfiguration",
                                             "StepScalingPolicyConfiguration") if k in policy}
            self.autoscaling.put_scaling_policy(
                PolicyName=policy["PolicyName"], ServiceNamespace="sagemaker", ResourceId=resource,
                ScalableDimension=SCALABLE_DIMENSION, PolicyType=policy["PolicyType"], **kwargs,
            )
        self.note(f"autoscaling of {endpoint} registered again ({target['MinCapacity']}-{target['MaxCapacity']})")

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


def register(commands) -> None:
    from llava_sessions.deploy.artifacts import _aws_arguments

    deploy = commands.add_parser(
        "deploy", help="create the SageMaker model, endpoint config and endpoint, and wait for it",
        description="Create (or find already there) a SageMaker real-time endpoint serving the model "
        "archive that `upload` put on S3 with the image `image push` built. Idempotent.",
    )
    _spec_arguments(deploy, update=False)
    _aws_arguments(deploy)
    deploy.set_defaults(run=cmd_deploy)

    update = commands.add_parser(
        "update", help="roll an endpoint to a new model or settings, then delete the old config and model",
        description="Options not given keep the endpoint's current values.",
    )
    _spec_arguments(update, update=True)
    _aws_arguments(update)
    update.set_defaults(run=cmd_update)

    teardown = commands.add_parser(
        "teardown", help="delete an endpoint, its endpoint config and model, and its autoscaling")
    teardown.add_argument("--name", required=True, help="endpoint name")
    teardown.add_argument("--keep-model", action="store_true", help="keep the SageMaker model(s)")
    _wait_arguments(teardown)
    _aws_arguments(teardown)
    teardown.set_defaults(run=cmd_teardown)


def _spec_arguments(parser, *, update: bool) -> None:
    keep = " (default: the current value)" if update else ""
    parser.add_argument("--name", required=True, help="endpoint name")
    parser.add_argument("--image", required=not update, help="container image URI in ECR" + keep)
    parser.add_argument("--model-data", required=not update, metavar="S3_URI",
                        help="s3://bucket/prefix/ from `upload`, or an s3://.../model.tar.gz" + keep)
    parser.add_argument("--instance-type", help=f"default {DEFAULTS['instance_type']}" + keep)
    parser.add_argument("--instance-count", type=int, help="initial instances (default 1)" + keep)
    parser.add_argument("--role", help=f"execution role ARN (default: ${ENV_ROLE}, or the sagemaker SDK's "
                                       "execution role when installed)" + keep)
    parser.add_argument("--memory-budget-gb", type=float,
                        help="GiB of device memory a worker's sessions may hold (default: automatic)")
    parser.add_argument("--session-ttl", type=int, help="session life in seconds (default: the archive's)")
    parser.add_argument("--download-timeout", type=int,
                        help=f"seconds to copy the model in (default {DEFAULTS['download_timeout_s']}, max 3600)" + keep)
    parser.add_argument("--startup-timeout", type=int,
                        help=f"seconds for the container to pass /ping (default {DEFAULTS['startup_timeout_s']}, "
                             "max 3600)" + keep)
    parser.add_argument("--routing", choices=["LEAST_OUTSTANDING_REQUESTS", "RANDOM"],
                        help="how new sessions are spread (default LEAST_OUTSTANDING_REQUESTS)" + keep)
    parser.add_argument("--env", action="append", metavar="KEY=VALUE",
                        help="extra container environment, e.g. LLAVA_SESSIONS_S3_ALLOWED_BUCKETS=my-images")
    parser.add_argument("--autoscale-min", type=int, help="minimum instances (default: --instance-count)")
    parser.add_argument("--autoscale-max", type=int, help="maximum instances; turns on target-tracking autoscaling")
    parser.add_argument("--autoscale-target", type=float,
                        help="invocations per instance per minute to aim for (default 30)")
    _wait_arguments(parser)


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


def check_model_data_exists(s3, uri: str, err=None) -> None:
    """Refuse a --model-data with nothing behind it before SageMaker spends minutes finding out."""
    from botocore.exceptions import ClientError
    from llava_sessions.deploy.artifacts import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    try:
        if uri.endswith(".tar.gz"):
            s3.head_object(Bucket=bucket, Key=key)
            return
        found = s3.list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1).get("KeyCount", 0)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code not in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            print(f"could not check {uri} ({code or exc}); going on", file=err or sys.stderr)
            return
        found = 0
    if not found:
        raise ConfigError(f"nothing at {uri}: run `llava-sessions upload` first and pass the URI it prints")


def cmd_deploy(args) -> int:
    plan = plan_from_args(args)
    check_model_data_exists(aws.client("s3", args.region, args.profile), plan.model.model_data)
    life = lifecycle(args)
    return _run(lambda: life.deploy(plan, wait=args.wait))


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
        if args.model_data:
            check_model_data_exists(aws.client("s3", args.region, args.profile), plan.model.model_data)
        life.update(plan, wait=args.wait)

    return _run(action)


def cmd_teardown(args) -> int:
    name = check_endpoint_name(args.name)
    life = lifecycle(args)
    return _run(lambda: life.teardown(name, keep_model=args.keep_model, wait=args.wait))


__all__ = [
    "AutoscaleSpec",
    "DeployError",
    "Lifecycle",
    "ModelSpec",
    "Plan",
    "VariantSpec",
    "container_environment",
    "plan_from_args",
    "register",
    "resolve_role",
]
