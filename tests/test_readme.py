"""The README's Python examples run exactly as written (each in a fresh interpreter, in an empty directory)."""

import re
import subprocess
import sys

import pytest

from tests.cli import ROOT, env

pytestmark = pytest.mark.slow

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
API = BLOCKS[BLOCKS.index(next(b for b in BLOCKS if "create_model_config(\"distilbert-base-uncased (66M)\")" in b)):]


def test_the_python_api_section_has_three_examples():
    assert len(API) == 3


@pytest.mark.parametrize("index,expected", [(0, "Parameters: 66,362,880"), (1, None), (2, "3")])
def test_readme_example_runs_as_written(tmp_path, index, expected):
    proc = subprocess.run([sys.executable, "-c", API[index]], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    if expected is None:  # the classifier separates its two classes
        assert float(last) >= 0.9, proc.stdout
    else:
        assert last == expected, proc.stdout
