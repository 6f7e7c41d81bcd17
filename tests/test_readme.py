"""The README's first screen and .ci/run agree, and the quickstart runs."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _first_bash_block() -> list:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _first_bash_block()
    assert len(commands) == 2
    assert "examples/quickstart.py" in commands[0]
    assert "pytest" in commands[1] and commands[1].startswith("pip install torch==2.13.0")
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_quickstart_runs_end_to_end():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--seeds", "2", "--steps", "30", "--pretrain-steps", "30"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Flat-LoRA" in out and "paired difference" in out
    table = [line for line in out.splitlines() if line.startswith(("LoRA ", "Flat-LoRA "))]
    assert len(table) == 2 and all(line.rstrip().endswith("True") for line in table)
