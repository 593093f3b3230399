"""The offline plots page: what is committed is wired into DVC and holds the pinned scripts
inline, and the builder refuses what it cannot inline safely (checked on fake tarballs, so the
test needs no npm)."""

from __future__ import annotations

import configparser
import io
import re
import tarfile
from pathlib import Path

import pytest

from pipeline.bench.plots_template import PACKAGES, TemplateBuildError, build_page, tarball_name

REPO = Path(__file__).resolve().parents[1]


def test_committed_template_is_wired_and_inlines_the_pinned_scripts():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    assert config["plots"]["html_template"] == "plots/offline.html"  # relative to .dvc/
    page = (REPO / ".dvc" / "plots" / "offline.html").read_text(encoding="utf-8")
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page  # DVC puts its CDN tags at {scripts}
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    for package, (version, member, integrity) in PACKAGES.items():
        assert f"/* {package}@{version} ({member}), BSD-3-Clause */" in page and integrity in page
    assert (REPO / ".dvc" / "plots" / "offline.html").stat().st_size < 2 * 2**20
    licences = (REPO / ".dvc" / "plots" / "LICENSES").read_text(encoding="utf-8")
    assert licences.count("Redistribution and use in source and binary forms") == len(PACKAGES)


def _tarball(folder: Path, package: str, version: str, script: str) -> None:
    with tarfile.open(folder / tarball_name(package, version), "w:gz") as tar:
        for name, text in (("package/build/x.min.js", script), ("package/LICENSE", "BSD")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_builder_inlines_and_refuses_unsafe_or_altered_scripts(tmp_path):
    _tarball(tmp_path, "a", "1.0.0", "window.a = 1;")
    page, notes = build_page(tmp_path, {"a": ("1.0.0", "package/build/x.min.js", None)})
    assert "window.a = 1;" in page and page.count("{plot_divs}") == 1 and notes[0].startswith("a@1.0.0 sha512-")
    _tarball(tmp_path, "b", "1.0.0", "x = '</SCRIPT>';")
    with pytest.raises(TemplateBuildError, match="</script"):
        build_page(tmp_path, {"b": ("1.0.0", "package/build/x.min.js", None)})
    _tarball(tmp_path, "c", "1.0.0", "s = '{scripts}';")
    with pytest.raises(TemplateBuildError, match="placeholder"):
        build_page(tmp_path, {"c": ("1.0.0", "package/build/x.min.js", None)})
    with pytest.raises(TemplateBuildError, match="integrity"):
        build_page(tmp_path, {"a": ("1.0.0", "package/build/x.min.js", "sha512-wrong")})
