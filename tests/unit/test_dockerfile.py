"""The container: Dockerfile and entrypoint linted, the entrypoint's command line, what the image
installs (a regular pip install must carry model-store/), and `serve --archive`."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from llava_sessions.config import RouterConfig
from llava_sessions.cli import main
from llava_sessions.deploy import image

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "container"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} is missing: install the test extra (pip install -e '.[test]')"
    return str(path)


# --- linters ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([tool("hadolint"), "--no-color", str(CONTAINER / "Dockerfile")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_entrypoint_passes_shellcheck():
    proc = subprocess.run([tool("shellcheck"), "--shell=sh", str(CONTAINER / "entrypoint.sh")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the entrypoint ----------------------------------------------------------------------------


@pytest.fixture
def entrypoint(tmp_path):
    """Runs container/entrypoint.sh with a stand-in `llava-sessions` that reports how it was called."""
    fake = tmp_path / "bin" / "llava-sessions"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "ppid=$PPID"\nfor a in "$@"; do echo "arg=$a"; done\n')
    fake.chmod(0o755)

    def run(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], int]:
        environ = {"PATH": f"{fake.parent}:/usr/bin:/bin", **(env or {})}
        proc = subprocess.Popen(["/bin/sh", str(CONTAINER / "entrypoint.sh"), *args], env=environ,
                                stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        lines = out.splitlines()
        return [line[4:] for line in lines if line.startswith("arg=")], int(lines[0].split("=")[1])

    return run


def test_serve_runs_the_stack_on_8080_with_the_sagemaker_model_dir(entrypoint):
    args, parent = entrypoint("serve")
    assert args == ["serve", "--host", "0.0.0.0", "--port", "8080", "--archive", "/opt/ml/model"]
    # exec: the server replaces the shell, so SIGTERM from `docker stop` reaches it directly
    assert parent == os.getpid()
    assert entrypoint()[0] == args  # no command at all: serve too


def test_serve_reads_the_port_and_workers_from_the_environment(entrypoint):
    args, _ = entrypoint("serve", "--ready-timeout", "60",
                         env={"SAGEMAKER_BIND_TO_PORT": "9090", "LLAVA_SESSIONS_WORKERS": "2",
                              "LLAVA_SESSIONS_MODEL_DIR": "/data/archive"})
    assert args == ["serve", "--host", "0.0.0.0", "--port", "9090", "--archive", "/data/archive",
                    "--workers", "2", "--ready-timeout", "60"]


def test_other_commands_run_as_given(entrypoint):
    assert entrypoint("llava-sessions", "--help")[0] == ["--help"]


# --- what the image installs -------------------------------------------------------------------


def dockerfile() -> str:
    return (CONTAINER / "Dockerfile").read_text()


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_the_default_base_image_is_the_tables():
    default = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile(), re.MULTILINE)[1]
    assert default == image.dlc_image("us-east-1")


def package_dirs() -> dict[str, str]:
    """setup.cfg's package_dir: import name -> source folder."""
    lines = setup_cfg()["options"]["package_dir"].strip().splitlines()
    return dict((part.strip() for part in line.split("=")) for line in lines)


def test_every_source_folder_of_the_package_is_copied_in():
    copied = {word for line in dockerfile().splitlines() if line.startswith("COPY ")
              for word in line.split()[1:-1] if not word.startswith("--")}
    sources = {folder.split("/")[0] for folder in package_dirs().values()}
    assert sources <= copied, sources - copied
    for name in ("pyproject.toml", "setup.cfg", "README.md", "container/requirements.txt", "container/entrypoint.sh"):
        assert name in copied and (ROOT / name).exists()
    # and the ignore file lets each of them into the build context
    allowed = {line[1:].rstrip("/") for line in (CONTAINER / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert copied <= allowed, copied - allowed


def test_pinned_requirements_satisfy_setup_cfg():
    pins = {}
    for line in (CONTAINER / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[req.name.lower()] = spec.version
    options = setup_cfg()["options"]
    wanted = [Requirement(r) for r in options["install_requires"].split("\n") if r.strip()]
    wanted += [Requirement(r) for r in setup_cfg()["options.extras_require"]["serve"].split("\n") if r.strip()]
    unpinned = {"torch", "boto3"}  # the base image's CUDA build; boto3: see requirements.txt
    for req in wanted:
        name = req.name.lower()
        if name in unpinned:
            assert name not in pins
            continue
        assert name in pins, f"{name} is not pinned in container/requirements.txt"
        assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {req}"
    assert pins["torchserve"] == pins["torch-model-archiver"] == "0.12.0"


def test_a_regular_install_carries_the_templates(tmp_path):
    """What `pip install /tmp/src[serve]` in the Dockerfile does: a wheel, not an editable install."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in ("llava_sessions", "handler", "deploy", "model-store"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, timeout=300, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("llava_sessions-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in ("config.properties", "model-config.yaml"):
        assert f"llava_sessions/model_store/{template}" in names
    # every Python package in the source folders (a subpackage missing from setup.cfg's list, too)
    for import_name, folder in package_dirs().items():
        for init in (src / folder).rglob("__init__.py"):
            relative = init.relative_to(src / folder).as_posix()
            assert f"{import_name.replace('.', '/')}/{relative}" in names, f"{folder}/{relative} not in the wheel"

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = (
        "import llava_sessions, llava_sessions.torchserve_process as tp\n"
        "from llava_sessions.archive import TEMPLATE_DIR, MODEL_CONFIG_TEMPLATE, default_handler_file\n"
        f"assert llava_sessions.__file__.startswith({str(target)!r}), llava_sessions.__file__\n"
        f"assert TEMPLATE_DIR == __import__('pathlib').Path({str(target)!r}) / 'llava_sessions' / 'model_store'\n"
        "assert MODEL_CONFIG_TEMPLATE.is_file() and tp.CONFIG_TEMPLATE.is_file()\n"
        "assert default_handler_file().is_file()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env, cwd=tmp_path)


# --- serve --archive ---------------------------------------------------------------------------


@pytest.fixture
def built_archive(tmp_path):
    root = tmp_path / "opt-ml-model"
    (root / "MAR-INF").mkdir(parents=True)
    (root / "MAR-INF" / "MANIFEST.json").write_text("{}")
    return root


@pytest.fixture
def fake_stack(monkeypatch):
    """ServingStack stand-in: records how serve built it; its start() is a Ctrl-C."""
    import llava_sessions.serving_stack

    made = {}

    class Stack:
        def __init__(self, archive, run_dir, **kwargs):
            made.update(archive=archive, run_dir=run_dir, **kwargs)

        def start(self, ready_timeout):
            raise KeyboardInterrupt

        def stop(self):
            made["stopped"] = True

    monkeypatch.setattr(llava_sessions.serving_stack, "ServingStack", Stack)
    handler = signal.getsignal(signal.SIGTERM)
    yield made
    signal.signal(signal.SIGTERM, handler)  # serve installs its own


def test_serve_a_prebuilt_archive(built_archive, tmp_path, fake_stack):
    assert main(["serve", "--archive", str(built_archive), "--host", "0.0.0.0", "--workers", "2",
                 "--run-dir", str(tmp_path / "run")]) == 0
    assert fake_stack.pop("config") == RouterConfig()  # the router's limits: defaults here
    assert fake_stack.pop("worker_env") == {}  # no --compile: the workers' own setting
    assert fake_stack == {"archive": built_archive.resolve(), "run_dir": tmp_path / "run", "workers": 2,
                          "host": "0.0.0.0", "port": 8080, "stopped": True}


@pytest.mark.parametrize("extra, message", [
    (["--model", "/models/x"], "not both"),
    (["--session-ttl", "60"], "LLAVA_SESSIONS_SESSION_TTL_S"),
])
def test_serve_archive_conflicts(extra, message, built_archive, fake_stack, capsys):
    assert main(["serve", "--archive", str(built_archive), "--workers", "1", *extra]) == 2
    assert message in capsys.readouterr().err
    assert fake_stack == {}


def test_serve_archive_without_manifest_says_what_is_wrong(tmp_path, fake_stack, capsys):
    assert main(["serve", "--archive", str(tmp_path), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "no MAR-INF/MANIFEST.json" in err and "llava-sessions archive" in err
    assert fake_stack == {}
