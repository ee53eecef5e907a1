"""``odin-console``'s options: defaults, the Grafana link from the environment, and exit
code 2 with the reason on a bad one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from odin_fanout.console.cli import DEFAULT_GRAFANA, main, parse
from odin_fanout.control.paths import default_directory


def test_defaults_attach_to_the_default_directory() -> None:
    args = parse([], environ={})
    assert args.socket == []
    assert args.dir == default_directory({})
    assert args.grafana_url == DEFAULT_GRAFANA
    assert args.interval == 1.0
    assert parse([], environ={"XDG_RUNTIME_DIR": "/run/user/7"}).dir == Path("/run/user/7/odin")


def test_options_and_the_grafana_url_from_the_environment() -> None:
    environ = {"ODIN_GRAFANA_URL": "https://grafana.example/d/odin"}
    args = parse(
        [
            "--socket",
            "/run/odin/odin-1.sock",
            "--socket",
            "/run/odin/odin-2.sock",
            "--interval",
            "0.5",
        ],
        environ=environ,
    )
    assert args.socket == [Path("/run/odin/odin-1.sock"), Path("/run/odin/odin-2.sock")]
    assert args.grafana_url == "https://grafana.example/d/odin"
    assert args.interval == 0.5
    assert parse(["--grafana-url", "http://g:3000/d/x"], environ=environ).grafana_url == (
        "http://g:3000/d/x"
    )


@pytest.mark.parametrize(
    ("argv", "environ", "words"),
    [
        (["--interval", "0.1"], {}, "must be from 0.2 to 60 seconds"),
        (["--interval", "soon"], {}, "not a number"),
        (["--grafana-url", "grafana:3000"], {}, "not an http(s) URL"),
        ([], {"ODIN_GRAFANA_URL": "ftp://grafana"}, "not an http(s) URL"),
        (["--socket", "/tmp/" + "x" * 120], {}, "longer than 107 bytes"),
        (["--socket", ""], {}, "empty socket path"),
        (["--bogus"], {}, "unrecognized arguments"),
    ],
)
def test_a_bad_option_exits_2_and_says_why(
    argv: list[str], environ: dict[str, str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(argv, environ=environ)
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_main_exits_2_before_starting_the_ui(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--interval", "100"])
    assert exited.value.code == 2
    assert "odin-console: error: argument --interval" in capsys.readouterr().err


def test_python_m_console_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "odin_fanout.console", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0
    assert "--socket PATH" in result.stdout
    assert "--grafana-url URL" in result.stdout
