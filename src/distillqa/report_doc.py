"""Report documents: a report is a list of blocks, rendered both to Markdown and to one self-contained
HTML file (its PNG plots inlined), and plots saved atomically. Used by the QA experiment, the
rationale experiment and the human study alike.

A block is a tuple: ("h1" | "h2" | "p", text), ("table", headers, rows), ("img", path relative to
the report's directory, alt text) or ("pre", text).
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from distillqa.io import atomic_path


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def to_markdown(doc: list[tuple]) -> str:
    out = []
    for kind, *rest in doc:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "table":
            headers, rows = rest
            out.append("\n".join(["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)] +
                                 ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", "<br>") for c in row) + " |"
                                  for row in rows]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
        elif kind == "pre":
            out.append("```yaml\n" + rest[0] + "```")
    return "\n\n".join(out) + "\n"


def to_html(doc: list[tuple], base: Path, title: str) -> str:
    """`doc` as one HTML page titled `title`; its images are read from `base` and embedded."""
    esc = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
           "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
           "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
           "th{background:#f0f0f0}img{max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;padding:1em}"
           "</style></head><body>"]
    for kind, *rest in doc:
        if kind in ("h1", "h2", "p"):
            out.append(f"<{kind}>{esc(rest[0])}</{kind}>")
        elif kind == "table":
            headers, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in headers) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{esc(str(c)).replace(chr(10), '<br>')}</td>" for c in row) + "</tr>"
                               for row in rows) + "</table>")
        elif kind == "img":
            data = base64.b64encode((base / rest[0]).read_bytes()).decode()
            out.append(f"<img alt='{esc(rest[1])}' src='data:image/png;base64,{data}'>")
        elif kind == "pre":
            out.append(f"<pre>{esc(rest[0])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
