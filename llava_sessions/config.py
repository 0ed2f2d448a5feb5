"""The serving configuration, validated at start: the worker's and the router's.

``ServingConfig`` is what each model worker runs with. Its values come from, lowest to highest
precedence: the defaults below, the ``handler:`` section of the archive's model-config.yaml, and
environment variables ``LLAVA_SESSIONS_<FIELD>`` (upper-case field name), which is how a SageMaker
Model's ``Environment`` reaches the container. ``RouterConfig`` is what the front process (the
affinity router) runs with: the same environment variables, then ``serve``'s flags. docs/limits.md
lists every setting. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from llava_sessions.errors import ConfigError

ENV_PREFIX = "LLAVA_SESSIONS_"
# Where a worker that refuses to start (a ConfigError: an unsupported model, a bad setting) writes
# why, so the process that started TorchServe can stop waiting for it and say so at once.
START_REFUSAL_FILE_ENV = ENV_PREFIX + "START_REFUSAL_FILE"

MiB = 1024 * 1024


@dataclass(frozen=True)
class ServingConfig:
    # Where the checkpoint lives: a local directory or a hub id. Empty means
    # "the directory the archive was unpacked to" (the handler fills it in).
    model: str = ""
    # "auto" picks cuda:<gpu_id> when TorchServe gives one, else cpu.
    device: str = "auto"
    # "auto" keeps the checkpoint's dtype; or float32/float16/bfloat16.
    dtype: str = "auto"

    # Session life, counted from the open; the Expires header says when.
    session_ttl_s: int = 1200
    max_sessions_per_worker: int = 32  # more opens get 429 TOO_MANY_SESSIONS
    max_images_per_session: int = 4

    # Input limits. max_image_bytes is the encoded size; max_image_pixels
    # guards against decompression bombs (width * height as declared).
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 32_000
    default_max_new_tokens: int = 128
    max_new_tokens_limit: int = 2048

    # Device bytes this worker's sessions may hold (KV caches + image features on the
    # device). A positive value is used as is. 0 means auto, resolved once when the
    # engine starts, after the model is loaded:
    #   cuda: floor(0.9 * free device memory (torch.cuda.mem_get_info)) - R
    #   cpu:  floor(0.5 * MemAvailable from /proc/meminfo) - R
    # where R reserves the activations of one full-context prefill:
    #   R = max_context * (4 * hidden_size + 2 * intermediate_size) * dtype bytes.
    # Auto refuses to start if that leaves nothing. When a session or a turn needs room,
    # least recently used sessions give it back: KV first, then features to host memory
    # (cuda only), then eviction; a request that cannot fit even so gets 503.
    memory_budget_bytes: int = 0
    # Spare KV slots a session keeps between turns, from this many to twice (counted in its
    # bytes and the budget), so the next question appends in place instead of copying the
    # whole history into a bigger buffer. 64 covers a 20-token question; 0 keeps exactly the
    # tokens. LLaVA-1.5-7B fp16: 0.5 MiB per slot.
    kv_headroom_tokens: int = 64

    # Remote image sources are refused unless allow-listed.
    s3_allowed_buckets: tuple[str, ...] = ()
    https_allowed_hosts: tuple[str, ...] = ()
    image_fetch_timeout_s: float = 10.0

    # Log prompts, images and full session ids (off: they are users' data).
    log_content: bool = False

    # A turn that is not streamed stops after this many seconds, counted from when the router
    # received it, and answers what it has (finish_reason "deadline"): SageMaker drops a
    # non-streamed invocation that takes 60 s. 0: no deadline. Streamed turns have none.
    turn_deadline_s: float = 55.0
    # The decode step: "on" compiles it (torch.compile, CUDA graphs on a GPU), "off" runs it
    # eagerly, "auto" is on for CUDA and off for a CPU. A step that fails to compile runs eagerly.
    compile: str = "auto"
    # With the step compiled: seconds the worker spends compiling its shapes before it is ready.
    compile_warmup_s: float = 120.0
    # Torch threads of a worker on the CPU. 0: torch's default (every core); `serve` and `local`
    # set it to the cores divided by the workers on the host, so workers do not fight over cores.
    cpu_threads: int = 0

    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        positive = [
            "session_ttl_s",
            "max_sessions_per_worker",
            "max_images_per_session",
            "max_image_bytes",
            "max_image_pixels",
            "max_prompt_chars",
            "default_max_new_tokens",
            "max_new_tokens_limit",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"{name} must be > 0, got {getattr(self, name)}; set "
                    f"{ENV_PREFIX}{name.upper()} or handler.{name} in model-config.yaml"
                )
        if self.memory_budget_bytes < 0:
            raise ConfigError(
                f"memory_budget_bytes must be >= 0 (0 = auto), got {self.memory_budget_bytes}; set "
                f"{ENV_PREFIX}MEMORY_BUDGET_BYTES or handler.memory_budget_bytes in model-config.yaml"
            )
        if self.kv_headroom_tokens < 0:
            raise ConfigError(
                f"kv_headroom_tokens must be >= 0, got {self.kv_headroom_tokens}; set "
                f"{ENV_PREFIX}KV_HEADROOM_TOKENS or handler.kv_headroom_tokens in model-config.yaml"
            )
        if self.image_fetch_timeout_s <= 0:
            raise ConfigError("image_fetch_timeout_s must be > 0")
        _check_at_least(self, "turn_deadline_s", 0, "0 turns the deadline off")
        _check_at_least(self, "cpu_threads", 0, "0 keeps torch's default")
        _check_at_least(self, "compile_warmup_s", 0, "0 compiles each shape on first use")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ConfigError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens_limit ({self.max_new_tokens_limit}); raise the limit or lower the default"
            )
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"compile must be auto, on or off, got {self.compile!r}; set {ENV_PREFIX}COMPILE")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(
                f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}"
            )
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    @classmethod
    def from_sources(
        cls,
        yaml_section: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> "ServingConfig":
        """Merge defaults, a model-config.yaml ``handler:`` section and the environment."""
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, raw in (yaml_section or {}).items():
            if key in known:
                values[key] = _coerce(known[key], raw, f"handler.{key}")
            else:
                extra[key] = raw
        values.update(_from_environ_and_overrides(known, environ, overrides))
        return cls(**values, extra=extra)

    def replace(self, **changes: Any) -> "ServingConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RouterConfig:
    """The front process's limits (docs/limits.md): what one client connection or request may hold."""

    # Largest request body; above it 413 REQUEST_TOO_LARGE. SageMaker's own limit is 6 MB.
    max_request_bytes: int = 8 * MiB
    # A connection with no request in progress this long is closed (keep-alive idle, and a
    # connection that never sends a request).
    idle_timeout_s: float = 75.0
    # From the first byte of a request to its complete headers; past it 408 and the connection closes.
    header_timeout_s: float = 10.0
    # From the headers to the whole body; past it 408 REQUEST_TIMEOUT.
    body_timeout_s: float = 60.0
    # Open client connections; one more is answered 503 at once and closed.
    max_connections: int = 1000
    # On SIGTERM: new requests get 503, and the turns in flight get this long to finish before
    # they are cut (streams end with an error event). Docker's default stop timeout is 10 s.
    drain_seconds: float = 5.0

    def __post_init__(self) -> None:
        _check_at_least(self, "max_request_bytes", 1024, "", flag="--max-request-bytes")
        for name in ("idle_timeout_s", "header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}; set {ENV_PREFIX}{name.upper()}")
        _check_at_least(self, "max_connections", 1, "")
        _check_at_least(self, "drain_seconds", 0, "0 cuts what is in flight at once", flag="--drain-seconds")

    def connection_limits(self):
        """The limits each client connection runs under (connection_guard.py)."""
        from llava_sessions.connection_guard import ConnectionLimits

        return ConnectionLimits(self.idle_timeout_s, self.header_timeout_s, self.max_connections)

    @classmethod
    def from_sources(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "RouterConfig":
        """Defaults, then ``LLAVA_SESSIONS_<FIELD>`` variables, then ``overrides`` (flags; None: not given)."""
        known = {f.name: f for f in fields(cls)}
        given = {name: value for name, value in overrides.items() if value is not None}
        return cls(**_from_environ_and_overrides(known, environ, given))


def _from_environ_and_overrides(
    known: Mapping[str, dataclasses.Field], environ: Mapping[str, str] | None, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name, f in known.items():
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ and name not in overrides:  # an override (a flag) wins
            values[name] = _coerce(f, environ[env_name], env_name)
    for name, raw in overrides.items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _coerce(known[name], raw, name)
    return values


def _check_at_least(config: Any, name: str, least: float, hint: str, flag: str | None = None) -> None:
    value = getattr(config, name)
    if value < least:
        where = f"{ENV_PREFIX}{name.upper()}" + (f" or {flag}" if flag else "")
        raise ConfigError(f"{name} must be at least {least}{f' ({hint})' if hint else ''}, got {value}; set {where}")


def _coerce(f: dataclasses.Field, raw: Any, where: str) -> Any:
    """Turn a YAML or environment value into the field's type, or say what is wrong."""
    default = f.default if f.default is not dataclasses.MISSING else None
    try:
        if isinstance(default, bool):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if isinstance(default, int):
            return _number(int, raw, where, "a whole number")
        if isinstance(default, float):
            return _number(float, raw, where, "a number")
        if isinstance(default, tuple):
            if isinstance(raw, str):
                return tuple(p.strip() for p in raw.split(",") if p.strip())
            return tuple(str(p) for p in raw)
        return str(raw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _number(kind: type, raw: Any, where: str, what: str):
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}={raw!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{where}={raw!r} is not a finite number")
    return value
