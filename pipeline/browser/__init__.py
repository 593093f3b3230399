"""The per-clip error browser: one static page (`reports/browser/index.html`) to look at each clip
beside its prediction. records.py joins what earlier stages wrote, one row per clip; thumbs.py
writes middle-frame JPEGs; page.py renders the page from assets/ (HTML, CSS, script)."""
