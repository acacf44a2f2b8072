"""The `darht` console script: six subcommands, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distill.cli import SUBCOMMANDS, main

SIX = ("matrix", "recommend", "train-teacher", "distill", "evaluate", "pipeline")


def test_help_lists_the_six_subcommands():
    out = subprocess.run(["darht", "--help"], capture_output=True, text=True, check=True).stdout
    for name in SIX:
        assert f"    {name}" in out
    assert tuple(SUBCOMMANDS) == SIX


@pytest.mark.parametrize("name", SIX)
def test_every_subcommand_has_help_and_common_options(name, capsys):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    offers = {"recommend": (), "pipeline": ("--device",)}.get(name, ("--device", "--seed"))
    assert "--threads" in out and all(flag in out for flag in offers)  # a flag either acts or is not offered


def test_argument_errors_are_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "distill.cli", "nosuchcommand"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_user_error_becomes_one_line_exit_2(monkeypatch, capsys):
    from distill.cli import common
    from transfer_analysis.errors import UserError

    def boom(args):
        raise UserError("something the user can fix;\n use --this instead")

    import distill.cli.pipeline as pipeline

    monkeypatch.setattr(pipeline, "run", boom)
    assert main(["pipeline", "--config", "study.yaml"]) == 2
    err = capsys.readouterr().err
    assert err == "darht pipeline: error: something the user can fix; use --this instead\n"
    assert common.parse_json_kwargs('{"a": 1}', "--x") == {"a": 1}
    with pytest.raises(UserError, match="not valid JSON"):
        common.parse_json_kwargs("{a: 1}", "--student-kwargs")
    with pytest.raises(UserError, match="JSON object"):
        common.parse_json_kwargs("[1]", "--student-kwargs")
