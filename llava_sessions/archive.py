"""Build the TorchServe model archive for the LLaVA sessions handler. Torch-free.

The archive holds the handler entry file, a model-config.yaml rendered from
``model-store/model-config.yaml`` and the checkpoint under ``model/``. The
``llava_sessions`` package itself is not copied: workers import it from the
environment TorchServe runs in.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from llava_sessions import __version__
from llava_sessions.config import ServingConfig
from llava_sessions.errors import ConfigError


def _template_dir() -> Path:
    """model-store/'s templates: package data of an installed wheel, else the source checkout's."""
    package = Path(__file__).resolve().parent
    installed = package / "model_store"  # setup.cfg maps model-store/ to llava_sessions.model_store
    return installed if (installed / "config.properties").is_file() else package.parent / "model-store"


TEMPLATE_DIR = _template_dir()
MODEL_CONFIG_TEMPLATE = TEMPLATE_DIR / "model-config.yaml"
CHECKPOINT_SUBDIR = "model"
HANDLER_ENTRY = "torchserve_handler.py"

# torch-model-archiver's formats and the name each gives its output.
FORMAT_SUFFIX = {"no-archive": "", "default": ".mar", "tgz": ".tar.gz"}

CHECKPOINT_PATTERNS = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

# Files below this size are fingerprinted by content, larger ones by size+mtime.
HASHED_FILE_LIMIT = 1 << 20


def check_archive_folder(path: Path, what: str = "the archive") -> Path:
    """A built no-archive model folder (what `upload` puts on S3, SageMaker's /opt/ml/model), resolved."""
    if not (Path(path) / "MAR-INF" / "MANIFEST.json").is_file():
        raise ConfigError(
            f"{what} {path} is not a TorchServe model archive folder (no MAR-INF/MANIFEST.json). "
            "Build one with `llava-sessions archive --model M --out DIR` and pass DIR/llava. In the "
            "container it is /opt/ml/model, where SageMaker copies what `llava-sessions upload` put on S3"
        )
    return Path(path).resolve()


def build_archive(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    model_name: str = "llava",
    max_sessions_per_worker: int,
    session_ttl_s: int,
    handler_overrides: Mapping[str, Any] | None = None,
    fmt: str = "no-archive",
    handler_file: str | Path | None = None,
) -> Path:
    """Build (or reuse) the archive ``out_dir/<model_name><suffix>`` and return its path.

    ``fmt`` is "no-archive" (a directory TorchServe loads in place: no
    extraction copy of the weights), "default" (.mar) or "tgz" (.tar.gz, e.g.
    SageMaker model data). Rebuilding with identical inputs is skipped.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    handler_path = Path(handler_file) if handler_file else default_handler_file()
    _check_arguments(fmt, max_sessions_per_worker, session_ttl_s, handler_path)
    checkpoint = checkpoint_files(model_dir)
    model_config = render_model_config(
        max_sessions_per_worker=max_sessions_per_worker,
        session_ttl_s=session_ttl_s,
        handler_overrides=handler_overrides,
    )
    target = out_dir / f"{model_name}{FORMAT_SUFFIX[fmt]}"
    stamp_path = out_dir / f".{target.name}.fingerprint"
    stamp = _fingerprint(model_name, fmt, handler_path, model_config, checkpoint)
    if target.exists() and _read_text(stamp_path) == stamp:
        return target

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        built = _run_archiver(Path(tmp), model_name, fmt, handler_path, model_config, checkpoint)
        _replace(built, target)
    _write_atomically(stamp_path, stamp)
    return target


def default_handler_file() -> Path:
    """The handler entry file of the installed package (handler/torchserve_handler.py)."""
    # find_spec locates the subpackage without importing it (it imports torch).
    spec = importlib.util.find_spec("llava_sessions.handler")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("package llava_sessions.handler not found; install llava-sessions")
    return Path(list(spec.submodule_search_locations)[0]) / HANDLER_ENTRY


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The files of a Hugging Face checkpoint the archive needs; safetensors weights only."""
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not a checkpoint directory: config.json missing")
    files = sorted({p for p in _glob(model_dir, CHECKPOINT_PATTERNS) if p.is_file()})
    if not any(p.name.endswith(".safetensors") for p in files):
        pickles = sorted(p.name for p in _glob(model_dir, PICKLE_WEIGHT_PATTERNS))
        if pickles:
            raise ConfigError(
                f"{model_dir} holds only pickle weights ({', '.join(pickles)}); they can run "
                "arbitrary code when loaded. Convert the checkpoint to safetensors "
                "(model.save_pretrained(dir, safe_serialization=True)) and build again"
            )
        raise ConfigError(f"{model_dir} holds no *.safetensors weights")
    return files


def _glob(directory: Path, patterns: tuple[str, ...]) -> Iterator[Path]:
    for pattern in patterns:
        yield from directory.glob(pattern)


def render_model_config(
    *,
    max_sessions_per_worker: int,
    session_ttl_s: int,
    handler_overrides: Mapping[str, Any] | None = None,
    template: Path = MODEL_CONFIG_TEMPLATE,
) -> str:
    """model-config.yaml text: the template with session and handler values filled in."""
    config = yaml.safe_load(template.read_text())
    config["handler"] = _handler_section(
        config.get("handler") or {}, max_sessions_per_worker, session_ttl_s, handler_overrides or {}
    )
    header = f"# Generated by llava_sessions.archive from {template.name}; see its comments.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def _handler_section(
    section: Mapping[str, Any],
    max_sessions_per_worker: int,
    session_ttl_s: int,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    """The template's handler section plus overrides, validated as a ServingConfig."""
    known = {f.name for f in fields(ServingConfig)} - {"extra"}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(
            f"unknown handler settings {sorted(unknown)}; known: {sorted(known)}"
        )
    clashing = set(overrides) & {"session_ttl_s", "max_sessions_per_worker"}
    if clashing:
        raise ConfigError(f"set {sorted(clashing)} through build_archive's own arguments")
    merged = copy.deepcopy(dict(section))
    merged.update(overrides)
    merged.update(session_ttl_s=session_ttl_s, max_sessions_per_worker=max_sessions_per_worker)
    ServingConfig.from_sources(merged, environ={})
    return merged


def _check_arguments(fmt: str, max_sessions_per_worker: int, session_ttl_s: int, handler_path: Path) -> None:
    if fmt not in FORMAT_SUFFIX:
        raise ConfigError(f"fmt must be one of {sorted(FORMAT_SUFFIX)}, got {fmt!r}")
    for name, value in (
        ("max_sessions_per_worker", max_sessions_per_worker),
        ("session_ttl_s", session_ttl_s),
    ):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if not handler_path.is_file():
        raise ConfigError(f"handler file not found: {handler_path}")


def _fingerprint(
    model_name: str, fmt: str, handler_path: Path, model_config: str, checkpoint: list[Path]
) -> str:
    """A digest of everything that goes into the archive, and of the archiver's version."""
    from model_archiver import __version__ as archiver_version

    inputs = {
        "package": __version__,
        "archiver": archiver_version,
        "model_name": model_name,
        "fmt": fmt,
        "handler": _sha256(handler_path),
        "model_config": hashlib.sha256(model_config.encode()).hexdigest(),
        "checkpoint": [_file_identity(p) for p in checkpoint],
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _file_identity(path: Path) -> list:
    st = path.stat()
    if st.st_size < HASHED_FILE_LIMIT:
        return [path.name, st.st_size, _sha256(path)]
    return [path.name, st.st_size, st.st_mtime_ns]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run_archiver(
    tmp: Path,
    model_name: str,
    fmt: str,
    handler_path: Path,
    model_config: str,
    checkpoint: list[Path],
) -> Path:
    """Run torch-model-archiver in ``tmp`` and return the artifact it made."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import generate_model_archive

    config_file = tmp / "model-config.yaml"
    config_file.write_text(model_config)
    # --extra-files copies a folder's *contents* to the archive root, so the
    # checkpoint is staged as extra/model/... to land under model/.
    extra = tmp / "extra"
    staged = extra / CHECKPOINT_SUBDIR
    _link_or_copy(checkpoint, staged)
    export = tmp / "export"
    export.mkdir()
    # no-archive: the archiver would copy the weights twice (to $TMPDIR, then
    # to the export dir); move the staged folder in afterwards instead.
    in_place = fmt == "no-archive"
    with _archiver_lock(model_name):
        generate_model_archive(
            ModelArchiverConfig(
                model_name=model_name,
                handler=str(handler_path),
                version=__version__,
                extra_files=None if in_place else str(extra),
                export_path=str(export),
                archive_format=fmt,
                config_file=str(config_file),
            )
        )
    artifact = export / f"{model_name}{FORMAT_SUFFIX[fmt]}"
    if in_place:
        staged.rename(artifact / CHECKPOINT_SUBDIR)
    return artifact


def _link_or_copy(files: list[Path], dest: Path) -> None:
    """Hard-link files into dest (free on one filesystem), else copy them."""
    dest.mkdir(parents=True)
    for src in files:
        try:
            os.link(src, dest / src.name)
        except OSError:
            shutil.copy2(src, dest / src.name)


@contextlib.contextmanager
def _archiver_lock(model_name: str) -> Iterator[None]:
    """Serialise archiver runs: it stages in $TMPDIR/<model_name> and deletes that first."""
    lock_path = Path(tempfile.gettempdir()) / f".llava-sessions-archiver-{model_name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _replace(built: Path, target: Path) -> None:
    """Put ``built`` at ``target``; an old directory moves next to ``built`` (a temp dir)."""
    if target.is_dir():
        target.rename(built.parent / f".old-{target.name}")
    os.replace(built, target)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
