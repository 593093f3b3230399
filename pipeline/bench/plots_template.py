"""Build `.dvc/plots/offline.html`, the HTML page `dvc plots show` / `dvc plots diff` fill in,
with vega, vega-lite and vega-embed inlined: `make plots-template` (maintainers only; the
result is committed, so a fresh clone renders plots with no npm and no network).

Decisions:
- The scripts come from the packages' own npm tarballs (`npm pack`), pinned in `PACKAGES` with
  their registry integrity, so the bytes are the published UMD builds and nothing else.
- The page has no `{scripts}` placeholder: DVC fills that one with its CDN `<script src>` tags,
  so leaving it out is what keeps the page offline. `{plot_divs}` is where DVC puts the plots.
- A script containing `</script` or one of DVC's placeholders would break the page or be
  rewritten by DVC's `str.replace`; the builder refuses it rather than escaping minified code.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import tarfile
from pathlib import Path

from pipeline.errors import MerError
from pipeline.stages import entry_point

# name -> (version, file inside the tarball, sha512 integrity from `npm view <pkg>@<v> dist.integrity`)
PACKAGES = {
    "vega": ("6.3.0", "package/build/vega.min.js",
             "sha512-L/ykPslBI5QiElzs7jD01c/0EP2yzJ0SdQ3WLZkgBsmykNkhfilWLAa24RzDx67rilNLdeBCJVCmogi40xJ6yA=="),
    "vega-lite": ("6.5.0", "package/build/vega-lite.min.js",
                  "sha512-fMXF6s0MrIg0UTWnLIfeFtgSLzVhyzSKobzGrh5rhS+mL6FOYFG3m7ouJ4U23gj65EK+gl9FIIT5w7wLNaAzkA=="),
    "vega-embed": ("7.3.0", "package/build/vega-embed.min.js",
                   "sha512-wQ8s5GaSzqoKgmRfbRolgBrjE2CP7ZKHXqH7NijxMqPjpdWxSs4Dn8tvp9g0giQvh2cK+3p56sxjWWM0wNngGw=="),
}
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>DVC plots (offline)</title>
<!-- {notice} -->
{inline_scripts}
<style>
  body {{ font-family: system-ui, sans-serif; margin: 16px; }}
  table {{ border-spacing: 15px; }}
  .vega-embed {{ margin: 8px 16px 24px 0; }}
</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


class TemplateBuildError(MerError, RuntimeError):
    """An npm tarball is missing, altered, or holds a script that cannot be inlined as is."""


def tarball_name(package: str, version: str) -> str:
    return f"{package}-{version}.tgz"  # what `npm pack <package>@<version>` writes


def read_script(tarball: Path, member: str, integrity: str | None) -> tuple[str, str]:
    """(script text, its tarball's sha512 integrity string) after checking both."""
    if not tarball.is_file():
        raise TemplateBuildError(f"{tarball} not found; run `npm pack` as `make plots-template` does")
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if integrity is not None and digest != integrity:
        raise TemplateBuildError(f"{tarball}: integrity {digest} differs from the pinned {integrity}")
    with tarfile.open(tarball) as tar:
        text = tar.extractfile(member).read().decode("utf-8")
    if "</script" in text.lower():
        raise TemplateBuildError(f"{tarball}:{member} contains '</script', which would end the inline tag")
    found = [p for p in DVC_PLACEHOLDERS if p in text]
    if found:
        raise TemplateBuildError(f"{tarball}:{member} contains DVC placeholder(s) {found}")
    return text, digest


def build_page(npm_dir: Path, packages: dict = PACKAGES) -> tuple[str, list[str]]:
    """(the template page, one licence line per package)."""
    scripts, notes = [], []
    for package, (version, member, integrity) in packages.items():
        text, digest = read_script(Path(npm_dir) / tarball_name(package, version), member, integrity)
        scripts.append(f"<script>/* {package}@{version} ({member}), BSD-3-Clause */\n{text}\n</script>")
        notes.append(f"{package}@{version} {digest}")
    notice = ("vega, vega-lite, vega-embed inlined from their npm packages, BSD-3-Clause, "
              "see .dvc/plots/LICENSES: " + "; ".join(notes))
    return PAGE.format(notice=notice, inline_scripts="\n".join(scripts)), notes


def licences(npm_dir: Path, notes: list[str], packages: dict = PACKAGES) -> str:
    """The LICENSES file: what was inlined, its integrity, and each package's own LICENSE text."""
    parts = ["Scripts inlined into offline.html (built by `make plots-template`, pipeline/bench/plots_template.py).",
             "Each build bundles its own dependencies: vega the d3-* modules (ISC) and vega-* modules",
             "(BSD-3-Clause); vega-lite vega-util/vega-expression (BSD-3-Clause) and tslib (0BSD);",
             "vega-embed vega-themes, vega-tooltip (BSD-3-Clause), fast-json-patch,",
             "json-stringify-pretty-compact (MIT) and semver (ISC).", "", *notes, ""]
    for package, (version, _member, _integrity) in packages.items():
        with tarfile.open(Path(npm_dir) / tarball_name(package, version)) as tar:
            text = tar.extractfile("package/LICENSE").read().decode("utf-8")
        parts += [f"==== {package}@{version}: package/LICENSE ====", text.strip(), ""]
    return "\n".join(parts)


@entry_point
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.plots_template", description=__doc__)
    parser.add_argument("--npm", type=Path, default=Path("build/npm"), help="folder holding the npm pack tarballs")
    parser.add_argument("--out", type=Path, default=Path(".dvc/plots/offline.html"))
    parser.add_argument("--print-specs", action="store_true", help="print the `npm pack` arguments and stop")
    args = parser.parse_args(argv)
    if args.print_specs:  # the Makefile asks here, so the versions live in PACKAGES alone
        print(" ".join(f"{name}@{version}" for name, (version, _m, _i) in PACKAGES.items()))
        return
    page, notes = build_page(args.npm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(page, encoding="utf-8")
    (args.out.parent / "LICENSES").write_text(licences(args.npm, notes), encoding="utf-8")
    print(f"{args.out}: {len(page.encode()) / 1024:.0f} KiB; " + "; ".join(notes))


if __name__ == "__main__":
    main()
