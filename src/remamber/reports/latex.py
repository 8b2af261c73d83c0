"""Small LaTeX helpers (booktabs + multirow only, so tables compile in a minimal document)."""

from __future__ import annotations

_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}

CHECK = r"$\surd$"  # base LaTeX, unlike \checkmark (amssymb)
DASH = "--"


def escape(text: str) -> str:
    """Escape LaTeX special characters in plain text."""
    return "".join(_ESCAPES.get(ch, ch) for ch in str(text))


def bold(cell: str) -> str:
    return rf"\textbf{{{cell}}}"


def italic(cell: str) -> str:
    return rf"\textit{{{cell}}}"


def row(cells: list[str]) -> str:
    return " & ".join(cells) + r" \\"


def multicolumn(n: int, align: str, content: str) -> str:
    return rf"\multicolumn{{{n}}}{{{align}}}{{{content}}}"


def stacked(text: str) -> str:
    """Words on separate lines in one header cell (narrower columns)."""
    return r"\shortstack{" + r"\\".join(escape(w) for w in text.split()) + "}"


def multirow(n: int, content: str) -> str:
    return rf"\multirow{{{n}}}{{*}}{{{content}}}" if n > 1 else content


def wrap_table(body: list[str], colspec: str, caption: str, label: str, notes: list[str] | None = None) -> str:
    """A complete ``table`` float in small type with tight columns.

    The tabular is set in a box first; if it is wider than the line and graphicx is loaded, it is
    scaled down to the line width (``\\resizebox``), otherwise it is used as is. So the file compiles
    in a document with only booktabs and multirow, and fits the page once graphicx is there.
    """
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        rf"\label{{{label}}}",
        r"\scriptsize",
        r"\setlength{\tabcolsep}{2.5pt}",
        r"\setbox0=\hbox{%",
        rf"\begin{{tabular}}{{{colspec}}}",
        *body,
        r"\end{tabular}}%",
        r"\ifdim\wd0>\linewidth\ifdefined\resizebox\resizebox{\linewidth}{!}{\box0}\else\box0\fi"
        r"\else\box0\fi",
    ]
    for note in notes or []:
        lines += [r"\par\smallskip", note]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
