"""``vlm --help`` lists every command, and an unknown command is one line naming them all (exit 2)."""

from __future__ import annotations

import subprocess
import sys

from vlm.__main__ import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "export", "data", "explain", "index", "search", "retrieval",
                 "serve"):
        assert name in COMMANDS and f"\n  {name} " in out


def test_an_unknown_command_names_them_all(capsys):
    assert main(["nonsense\x1b[2J"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown command" in lines[0] and "\x1b" not in lines[0]
    assert all(name in lines[0] for name in COMMANDS)


def test_every_listed_command_answers_its_own_help():
    for name in COMMANDS:
        proc = subprocess.run([sys.executable, "-m", "vlm", name, "--help"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr[-500:])
