"""The README's quick start runs as printed, and CI runs the README's test command."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quickstart_block_runs_and_strategies_agree():
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "README-quickstart", "exec"), {"__name__": "readme"})
    norms = re.findall(r"\|df/dλ\| = ([0-9.]+)", buf.getvalue())
    assert len(norms) == 2 and norms[0] == norms[1] == "0.06003", buf.getvalue()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    test_cmd = [l for l in block.splitlines() if "pytest" in l]
    assert len(test_cmd) == 1
    assert test_cmd[0].strip() in ci
