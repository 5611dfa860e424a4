"""The README's example sessions (`$ reshard ...` blocks) print exactly what the README shows."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sessions() -> list[tuple[str, str]]:
    blocks = re.findall(r"```\n(\$ reshard [^\n]*)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [(command[2:], output) for command, output in blocks]


def test_readme_sessions_print_what_the_readme_shows(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples" / "tiny-llama", tmp_path / "examples" / "tiny-llama")
    found = sessions()
    assert [c.split()[1] for c, _ in found] == ["plan", "plan", "split", "merge", "verify"]
    for command, shown in found:
        args = shlex.split(command)[1:]
        run = subprocess.run([sys.executable, "-m", "reshard", *args], cwd=tmp_path, capture_output=True, text=True)
        printed = "\n".join(line.rstrip() for line in (run.stdout + run.stderr).splitlines())
        assert printed == shown.rstrip("\n"), command
