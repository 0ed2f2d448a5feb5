"""Shared fixtures: one tiny random-weight LLaVA per test run, written the way users get it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _tiny(tmp_path_factory, name: str, family: str):
    """``family``'s tiny checkpoint, written once per test run."""
    from llava_sessions.tiny_model import write_tiny_llava

    return write_tiny_llava(tmp_path_factory.mktemp(name), preset="tiny", family=family)


def _load(checkpoint):
    import torch

    from llava_sessions.handler.engine.model_loader import load_model

    # LLAVA_SESSIONS_TEST_DEVICE=cuda:0 runs the engine's tests on a GPU (a check for GPU hosts;
    # CI has none). The default is the CPU, where the tests' exact counters were written.
    return load_model(str(checkpoint), torch.device(os.environ.get("LLAVA_SESSIONS_TEST_DEVICE", "cpu")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return _tiny(tmp_path_factory, "tiny-llava", "llava")


@pytest.fixture(scope="session")
def loaded_tiny(tiny_model_dir):
    return _load(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory):
    """The SigLIP LLaVA family's tiny checkpoint (llava-interleave-qwen's kind: no CLS, ChatML)."""
    return _tiny(tmp_path_factory, "tiny-siglip", "llava-siglip")


@pytest.fixture(scope="session")
def loaded_siglip(tiny_siglip_dir):
    return _load(tiny_siglip_dir)


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory):
    """The LLaVA-NeXT family's tiny checkpoint (anyres tiles, Mistral template)."""
    return _tiny(tmp_path_factory, "tiny-next", "next")


@pytest.fixture(scope="session")
def loaded_next(tiny_next_dir):
    return _load(tiny_next_dir)


@pytest.fixture(scope="session")
def tiny_onevision_dir(tmp_path_factory):
    """The LLaVA-OneVision family's tiny checkpoint (SigLIP over anyres tiles, ChatML; no video)."""
    return _tiny(tmp_path_factory, "tiny-onevision", "onevision")


@pytest.fixture(scope="session")
def loaded_onevision(tiny_onevision_dir):
    return _load(tiny_onevision_dir)


def noise_image(seed: int, size: int = 32):
    """A reproducible RGB noise image (PIL's effect_noise is not seedable)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture
def images():
    """Two visibly different RGB images, the same on every run."""
    from PIL import Image

    return [Image.new("RGB", (40, 30), (200, 10, 10)), noise_image(0)]
