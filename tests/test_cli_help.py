"""``vlm --help`` lists every command, and an unknown command is one line naming them all (exit 2)."""

from __future__ import annotations

import subprocess
import sys

from vlm.__main__ import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "export", "data", "explain", "index", "search", "retrieval",
                 "serve", "eval"):
        assert name in COMMANDS and f"\n  {name} " in out


def test_an_unknown_command_names_them_all(capsys):
    assert main(["nonsense\x1b[2J"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown command" in lines[0] and "\x1b" not in lines[0]
    assert all(name in lines[0] for name in COMMANDS)


def test_every_listed_command_answers_its_own_help():
    # Two at a time: each is mostly a fresh interpreter's imports, on one core.
    pending = list(COMMANDS)
    while pending:
        running = {name: subprocess.Popen([sys.executable, "-m", "vlm", name, "--help"], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True) for name in pending[:2]}
        del pending[:2]
        for name, proc in running.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0 and "usage:" in out, (name, err[-500:])
