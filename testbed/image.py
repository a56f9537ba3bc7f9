"""The agent image: one Docker image for every node and GPU host.

The base is the registry's python:3.11-slim-bookworm when it can be pulled; otherwise an
offline Debian base made with debootstrap. Dependencies are downloaded on the host as wheels
and installed with --no-index, because containers may not reach a package index.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import subprocess
import sys
import tempfile
try:
    import tomllib
except ImportError:  # Python 3.10 (Ubuntu 22.04)
    import tomli as tomllib
from pathlib import Path

import docker
import docker.errors

from testbed.errors import TestbedError

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "agent.Dockerfile"
REGISTRY_BASE = "python:3.11-slim-bookworm"
OFFLINE_BASE = "dualpath-base:bookworm"
AGENT_REPOSITORY = "dualpath-agent"
# What the offline base carries: what the agents and the link tests run inside a host.
OFFLINE_PACKAGES = "python3,python3-venv,iproute2,net-tools,iperf3,iputils-ping,procps,bash"
IMAGE_PYTHON = "3.11"


def docker_client() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except docker.errors.DockerException as exc:
        raise TestbedError(
            f"cannot reach the Docker daemon ({exc}); start it with `make setup`"
        ) from exc
    return client


def project_dependencies() -> list[str]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def agent_image_tag() -> str:
    """The tag changes whenever the Dockerfile or the pinned dependencies change."""
    digest = hashlib.sha256(DOCKERFILE.read_bytes())
    digest.update("\n".join(project_dependencies()).encode())
    return f"{AGENT_REPOSITORY}:{digest.hexdigest()[:12]}"


def has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except docker.errors.ImageNotFound:
        return False


def ensure_base(client: docker.DockerClient) -> str:
    if has_image(client, REGISTRY_BASE):
        return REGISTRY_BASE
    try:
        repository, tag = REGISTRY_BASE.split(":")
        client.images.pull(repository, tag=tag)
        return REGISTRY_BASE
    except docker.errors.APIError as exc:
        reason = (exc.explanation or str(exc)).splitlines()[0][:120]
        print(f"  registry base unavailable ({reason});\n  "
              f"using the offline base {OFFLINE_BASE}", flush=True)
    if not has_image(client, OFFLINE_BASE):
        build_offline_base(client)
    return OFFLINE_BASE


def build_offline_base(client: docker.DockerClient) -> None:
    if shutil.which("debootstrap") is None:
        raise TestbedError("no registry base image and no debootstrap: run `make setup`")
    print(f"  building {OFFLINE_BASE} with debootstrap (about a minute)", flush=True)
    with tempfile.TemporaryDirectory(prefix="dualpath-base-") as tmp:
        root, tarball = Path(tmp) / "root", Path(tmp) / "root.tar"
        run = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={OFFLINE_PACKAGES}",
             "bookworm", str(root)],
            capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
            raise TestbedError(f"debootstrap failed: {' | '.join(tail)}")
        subprocess.run(["tar", "-C", str(root), "-cf", str(tarball), "."], check=True)
        repository, tag = OFFLINE_BASE.split(":")
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag)


def download_wheels(dest: Path) -> None:
    """Wheels for the image's CPython, whatever Python runs this."""
    arch = platform.machine()
    dest.mkdir(parents=True, exist_ok=True)
    requirements = dest / "requirements.txt"
    requirements.write_text("\n".join(project_dependencies()) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
           "--python-version", IMAGE_PYTHON, "--implementation", "cp",
           "--platform", f"manylinux2014_{arch}", "--platform", f"manylinux_2_17_{arch}",
           "--platform", f"manylinux_2_28_{arch}", "-d", str(dest), "-r", str(requirements)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise TestbedError(f"could not download the agent image's wheels: "
                           f"{run.stderr.strip().splitlines()[-1]}")


def build_agent_image(force: bool = False) -> str:
    client = docker_client()
    tag = agent_image_tag()
    if has_image(client, tag) and not force:
        print(f"==> agent image {tag} present")
        return tag
    print(f"==> building agent image {tag}", flush=True)
    base = ensure_base(client)
    with tempfile.TemporaryDirectory(prefix="dualpath-image-") as ctx:
        shutil.copy(DOCKERFILE, Path(ctx) / "Dockerfile")
        download_wheels(Path(ctx) / "wheels")
        try:
            client.images.build(path=ctx, tag=tag, buildargs={"BASE": base}, rm=True,
                                labels={"dualpath.testbed": "agent-image"})
        except docker.errors.BuildError as exc:
            log = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)
            raise TestbedError(f"agent image build failed: {log.strip().splitlines()[-1]}") from exc
    return tag


def require_agent_image(client: docker.DockerClient) -> str:
    tag = agent_image_tag()
    if not has_image(client, tag):
        raise TestbedError(f"agent image {tag} is missing: run `make setup`")
    return tag
