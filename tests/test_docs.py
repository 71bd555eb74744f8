"""The API reference builds from the docstrings without a warning, and covers the API."""

import re
import subprocess
from pathlib import Path

import pytest

import pathkernel as pk

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("pdoc")
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_docs.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.strip() == "", r.stderr[-3000:]
    page = (tmp_path / "pathkernel.html").read_text()
    for name in pk.__all__:
        if name not in ("__version__", "losses"):  # losses: a module, its own page
            assert f'id="{name}"' in page, name
    losses = (tmp_path / "pathkernel" / "losses.html").read_text()
    assert all(f'id="{f}"' in losses for f in ("cross_entropy", "mse", "margin"))
    # the Google-style sections are read as such (an "Args" list, not a paragraph)
    doc = page[page.index('id="tangent_kernel"') :]
    assert re.search(r"<h6[^>]*>Arguments", doc[:40000]), "no Arguments section"


def test_every_public_entry_point_has_a_docstring():
    for name in pk.__all__:
        obj = getattr(pk, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), name
