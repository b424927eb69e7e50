"""Write .dvc/plots/offline.html, the page template of `dvc plots show/diff`, from the vendored
bundles in .dvc/plots/vendor: DVC's own page loads vega from a CDN and is blank offline.

    python scripts/offline_plots_template.py           # rewrite the template
    python scripts/offline_plots_template.py --check   # exit 1 if it is out of date

The three bundles are inlined with their licences, so the page DVC writes works wherever it is
written (`-o DIR`) and can be mailed on its own. The template has no `{scripts}` placeholder:
that is where DVC would put its CDN <script> tags.
"""

import argparse
import sys
from pathlib import Path

PLOTS = Path(__file__).resolve().parents[1] / ".dvc" / "plots"
TEMPLATE = PLOTS / "offline.html"
# In load order: vega-lite needs vega, vega-embed needs both. Versions as in vendor/README.md.
BUNDLES = [
    ("vega", "5.33.1", "vega/vega.min.js"),
    ("vega-lite", "5.23.0", "vega-lite/vega-lite.min.js"),
    ("vega-embed", "6.29.0", "vega-embed/vega-embed.min.js"),
]

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Written by scripts/offline_plots_template.py from .dvc/plots/vendor; do not edit. -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def script(name: str, version: str, bundle: str) -> str:
    """One inline <script>: the licence as a comment, then the npm bundle unchanged."""
    folder = PLOTS / "vendor" / Path(bundle).parent
    code = (PLOTS / "vendor" / bundle).read_text(encoding="utf8")
    licence = (folder / "LICENSE").read_text(encoding="utf8").strip()
    # Text that would end the <script> or the comment early, or that DVC would replace.
    if "</script" in code.lower() or "*/" in licence:
        raise ValueError(f"{bundle} or its LICENSE cannot be inlined as they are")
    if any(f"{{{p}}}" in code + licence for p in ("plot_divs", "scripts", "refresh_tag")):
        raise ValueError(f"{bundle} or its LICENSE holds one of DVC's placeholders")
    return f"<script>\n/* {name} {version} (npm), {bundle}\n\n{licence}\n*/\n{code}\n</script>"


def page() -> str:
    return PAGE.format(scripts="\n".join(script(*b) for b in BUNDLES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the template is stale")
    args = parser.parse_args()
    text = page()
    if args.check:
        current = TEMPLATE.read_text(encoding="utf8") if TEMPLATE.is_file() else ""
        if current != text:
            print(f"{TEMPLATE} is out of date: run {sys.argv[0]}", file=sys.stderr)
            return 1
        return 0
    TEMPLATE.write_text(text, encoding="utf8")
    print(f"wrote {TEMPLATE} ({len(text.encode()):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
