"""The sandbox's copy of the Python environment: a venv's package replaces the base
interpreter's package of the same name whole, and the base install is never written to."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from ipdc.isolation import interpreter


def test_a_venv_package_replaces_the_base_one_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tmp_path / "base"
    base_site = base / "lib" / "site-packages"
    (base_site / "pkg").mkdir(parents=True)
    (base_site / "pkg" / "core.py").write_text("VERSION = 2\n")
    (base_site / "pkg" / "only_in_2.py").write_text("")
    (base_site / "other.py").write_text("kept\n")
    venv_sites = [tmp_path / "venv" / "site-packages", tmp_path / "venv2" / "site-packages"]
    for number, site in enumerate(venv_sites, 3):
        (site / "pkg").mkdir(parents=True)
        (site / "pkg" / "core.py").write_text(f"VERSION = {number}\n")
    (venv_sites[0] / "link.py").symlink_to("pkg/core.py")
    copy = tmp_path / "copy"
    shutil.copytree(base, copy, symlinks=True, copy_function=interpreter._link_or_copy)
    monkeypatch.setattr(interpreter, "_site_dirs", lambda: [base_site, *venv_sites])

    interpreter._merge_sites(base, copy / "lib" / "site-packages")

    inner = copy / "lib" / "site-packages"
    assert (inner / "pkg" / "core.py").read_text() == "VERSION = 3\n"  # the first venv's, whole
    assert not (inner / "pkg" / "only_in_2.py").exists()
    assert (inner / "other.py").read_text() == "kept\n"
    assert (inner / "link.py").is_symlink() and (inner / "link.py").read_text() == "VERSION = 3\n"
    assert (base_site / "pkg" / "core.py").read_text() == "VERSION = 2\n"  # the base is untouched
    assert (base_site / "pkg" / "only_in_2.py").exists()


def test_a_package_others_cannot_read_is_copied_where_they_can(monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent run as a dedicated user imports IPDC from a copy when the source tree is private."""
    base = Path(tempfile.mkdtemp(prefix="ipdc-package-test-"))  # not under pytest's private tmp
    try:
        base.chmod(0o755)
        private = base / "home"
        package = private / "src" / "ipdc"
        (package / "sub" / "__pycache__").mkdir(parents=True)
        (package / "__init__.py").write_text("A = 1\n")
        (package / "sub" / "data.c").write_text("int x;\n")
        (package / "sub" / "__pycache__" / "x.pyc").write_bytes(b"cache")
        opt = base / "opt"
        opt.mkdir(mode=0o755)
        monkeypatch.setattr(interpreter, "COPY_ROOT", opt)
        private.chmod(0o700)
        copy = interpreter.readable_package(package)
        assert copy.parent == opt
        assert (copy / "ipdc" / "__init__.py").read_text() == "A = 1\n"
        assert (copy / "ipdc" / "sub" / "data.c").read_text() == "int x;\n"
        assert not (copy / "ipdc" / "sub" / "__pycache__").exists()
        assert interpreter.world_readable(copy / "ipdc" / "sub" / "data.c")
        assert interpreter.readable_package(package) == copy  # made once
        (package / "__init__.py").write_text("A = 2\n")
        assert interpreter.readable_package(package) != copy  # a changed tree gets its own copy
        private.chmod(0o755)
        for path in [package.parent, package, *package.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        assert interpreter.readable_package(package) == package.parent
    finally:
        shutil.rmtree(base)
