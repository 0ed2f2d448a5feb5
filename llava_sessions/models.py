"""Where models and build outputs live, and what ``--model`` means.

No ``--model`` means the offline tiny LLaVA (random weights), written once to
the cache. A directory is used as it is. Anything else is a hub id fetched
with huggingface_hub into its own cache. Torch is imported only to write the
tiny model.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from llava_sessions.errors import ConfigError

DEFAULT_MODEL = "tiny"
# Files a LLaVA checkpoint needs; pickle weights (*.bin, *.pt) are never fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def home() -> Path:
    """Cache root: $LLAVA_SESSIONS_HOME, else $XDG_CACHE_HOME/llava-sessions, else ~/.cache/llava-sessions."""
    if os.environ.get("LLAVA_SESSIONS_HOME"):
        return Path(os.environ["LLAVA_SESSIONS_HOME"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "llava-sessions"


def resolve_model(model: str | None) -> Path:
    """A local checkpoint directory for ``--model`` (see module docstring)."""
    if not model or model == DEFAULT_MODEL:
        return ensure_tiny_model()
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or model.startswith((".", "/", "~")):
        raise ConfigError(f"--model {model!r} is not a checkpoint directory")
    return _download(model)


def ensure_tiny_model(preset: str = "tiny", seed: int = 0) -> Path:
    from llava_sessions.tiny_model import write_tiny_llava

    return write_tiny_llava(home() / "models" / f"{preset}-llava-seed{seed}", preset=preset, seed=seed)


def archive_dir_for(model_dir: Path) -> Path:
    """One archive folder per checkpoint, so switching models never rebuilds the other's."""
    digest = hashlib.sha256(str(model_dir).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", model_dir.name).strip("-") or "model"
    return home() / "archives" / f"{name}-{digest}"


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated model...
        raise ConfigError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Download the checkpoint where the hub is reachable and pass its directory to --model"
        ) from None
