"""A report page: index.html and report.md side by side, their PNGs, and report.json.

``Page`` collects headings, paragraphs, tables (text or pictures), figures and "Missing" notes,
then writes a self-contained folder: inline CSS, relative ``<img>`` links (it opens from disk with
no server and no network), the same content as markdown, and every plotted series as JSON.
``lpld report`` and ``benchmarks/report.py`` both write theirs with it; ``pyplot`` draws headless.
"""
from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 16px auto; max-width: 1500px;
       padding: 0 8px; color: #1b1b1b; line-height: 1.45; }
h1 { font-size: 26px; } h2 { font-size: 21px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 36px; }
table { border-collapse: collapse; margin: 10px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.picture { text-align: left; padding: 1px; line-height: 0; }
img { max-width: 100%; } .scroll { overflow-x: auto; }
img.pixels { image-rendering: pixelated; max-width: none; }
.missing { background: #fff4d6; border: 1px solid #e0c060; padding: 8px 14px; }
.note { color: #555; font-size: 14px; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported only when drawing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class Picture:
    """An image cell of a table: ``file`` relative to the page; ``pixels`` keeps it unsmoothed."""

    file: str
    alt: str
    pixels: bool = False


class Page:
    """A page written as index.html and report.md side by side, with its PNGs and report.json."""

    def __init__(self, folder: Path, title: str):
        self.folder, self.title = Path(folder), title
        self.folder.mkdir(parents=True, exist_ok=True)
        self.html: list[str] = []
        self.md: list[str] = []
        self.data: dict = {}
        self.missing: list[str] = []

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md.append(f"## {text}")

    def text(self, text: str, note: bool = False) -> None:
        """A paragraph; `backticks` become code in both forms."""
        escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
        self.html.append(f"<p class=\"note\">{escaped}</p>" if note else f"<p>{escaped}</p>")
        self.md.append(f"*{text}*" if note else text)

    def lack(self, what: str, how: str) -> None:
        """Say in place that a piece is missing and how to make it; also listed at the top."""
        self.missing.append(f"{what}: {how}")
        how = how[:1].upper() + how[1:]
        self.html.append(f"<p class=\"missing\">Missing: {html.escape(what)}. {_code(how)}.</p>")
        self.md.append(f"> Missing: {what}. {how}.")

    def table(self, header: list[str], rows: list[list]) -> None:
        """Cells are text or ``Picture``; numbers should come formatted."""
        def html_cell(cell, tag):
            if isinstance(cell, Picture):
                css = " class=\"pixels\"" if cell.pixels else ""
                return f"<{tag} class=\"picture\"><img{css} src=\"{html.escape(cell.file)}\" alt=\"{html.escape(cell.alt)}\"></{tag}>"
            css = ' class="num"' if tag == "td" and re.match(r"[-+]?[0-9]", str(cell)) else ""
            return f"<{tag}{css}>{html.escape(str(cell))}</{tag}>"

        def md_cell(cell):
            text = f"![{cell.alt}]({cell.file})" if isinstance(cell, Picture) else str(cell)
            return text.replace("|", "\\|")

        lines = ["<div class=\"scroll\"><table>", "<tr>" + "".join(html_cell(cell, "th") for cell in header) + "</tr>"]
        lines += ["<tr>" + "".join(html_cell(cell, "td") for cell in row) + "</tr>" for row in rows]
        self.html.append("\n".join(lines + ["</table></div>"]))
        self.md.append("\n".join([f"| {' | '.join(md_cell(c) for c in header)} |",
                                  "|" + "---|" * len(header),
                                  *(f"| {' | '.join(md_cell(c) for c in row)} |" for row in rows)]))

    def image(self, file: str, alt: str) -> None:
        self.html.append(f"<p><img src=\"{html.escape(file)}\" alt=\"{html.escape(alt)}\"></p>")
        self.md.append(f"![{alt}]({file})")

    def save(self, file: str, figure) -> None:
        """Save a matplotlib figure as ``file`` beside the page (and free it)."""
        figure.savefig(self.folder / file, dpi=100, bbox_inches="tight")
        pyplot().close(figure)

    def figure(self, file: str, figure, alt: str) -> None:
        """Save a matplotlib figure beside the page and show it."""
        self.save(file, figure)
        self.image(file, alt)

    def write(self) -> Path:
        """index.html, report.md and report.json; returns index.html's path."""
        top_html, top_md = [f"<h1>{html.escape(self.title)}</h1>"], [f"# {self.title}"]
        if self.missing:
            items = "".join(f"<li>{_code(item)}</li>" for item in self.missing)
            top_html.append(f"<div class=\"missing\"><b>Missing from this work directory</b><ul>{items}</ul></div>")
            top_md.append("**Missing from this work directory**\n\n" + "\n".join(f"- {item}" for item in self.missing))
        self.data["missing"] = self.missing
        page = "\n".join(["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
                          f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>",
                          *top_html, *self.html, "</body></html>", ""])
        (self.folder / "index.html").write_text(page, encoding="utf-8")
        (self.folder / "report.md").write_text("\n\n".join(top_md + self.md) + "\n", encoding="utf-8")
        (self.folder / "report.json").write_text(json.dumps(self.data, indent=1), encoding="utf-8")
        return self.folder / "index.html"


def _code(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def read_json(path: Path) -> dict | list | None:
    """The JSON at ``path``; None when it is missing or unreadable (the report says so, it never fails)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def format_bytes(count: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"
