"""Every ```python block in docs/*.md and README.md runs on the CPU (first line `# doc: no-run` skips it)."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks():
    out = []
    for path in FILES:
        text = open(path).read()
        for i, m in enumerate(BLOCK.finditer(text)):
            code = m.group(1)
            line = text[:m.start()].count("\n") + 1
            rel = os.path.relpath(path, ROOT)
            marks = () if not code.lstrip().startswith("# doc: no-run") else (pytest.mark.skip("doc: no-run"),)
            out.append(pytest.param(code, f"{rel}:{line}", id=f"{rel}:{line}", marks=marks))
    return out


def test_docs_exist():
    for name in ("index", "api", "migrating", "design", "performance"):
        assert os.path.exists(os.path.join(ROOT, "docs", f"{name}.md")), name


@pytest.mark.parametrize("code,where", _blocks())
def test_doc_block_runs(code, where):
    exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})
