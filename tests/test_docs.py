"""Every ```python block in README.md and docs/ runs as written (docs stay true to the code).

A block that is not meant to run on its own (a fragment, a child script shown beside its
parent) is fenced as ```py instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCKS = [
    pytest.param(block, id=f"{path.relative_to(ROOT)}#{i}")
    for path in FILES if path.exists()
    for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", path.read_text(),
                                         re.S | re.M))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_doc_example_runs(code: str, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
