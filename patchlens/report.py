"""A self-contained HTML report: headings, text, tables and plotly figures in one file.

plotly.js is inlined once (``plotlyjs="inline"``, the default), so the file opens offline in
any browser; ``plotlyjs="cdn"`` loads it from the plotly CDN instead (a file of kilobytes rather
than ~4.8 MB, that needs the internet to show its figures).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_CSS = """
body { font-family: -apple-system, Segoe UI, Roboto, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { border-bottom: 2px solid #444; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: .8rem 0; }
table { border-collapse: collapse; font-size: .85rem; }
th, td { border: 1px solid #ccc; padding: .2rem .45rem; text-align: right; }
th { white-space: normal; overflow-wrap: anywhere; max-width: 9rem; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
.caption { color: #555; font-size: .9rem; margin-bottom: 1rem; }
.figure { margin: 1rem 0; max-width: 100%; overflow-x: auto; }
.grid { display: flex; flex-wrap: wrap; gap: .5rem; }
"""


@dataclass
class HtmlReport:
    """Collects sections and writes them as one HTML file (`save`)."""

    title: str
    parts: list[str] = field(default_factory=list)
    n_figures: int = 0

    def heading(self, text: str, level: int = 2) -> HtmlReport:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def text(self, text: str) -> HtmlReport:
        self.parts.append(f"<p>{html.escape(text)}</p>")
        return self

    def table(self, rows: Any, caption: str = "", floatfmt: str = "{:.3f}") -> HtmlReport:
        """A table from a pandas DataFrame or a list of dicts."""
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict(orient="records")
        rows = list(rows)
        if not rows:
            return self.text("(empty table)")
        cols = list(rows[0])

        def fmt(v: Any) -> str:
            if isinstance(v, float):
                return floatfmt.format(v)
            return html.escape(str(v))

        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>"
                       for r in rows)
        self.parts.append(f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
                          f"<tbody>{body}</tbody></table></div>")
        if caption:
            self.parts.append(f'<div class="caption">{html.escape(caption)}</div>')
        return self

    def figure(self, fig: Any, caption: str = "") -> HtmlReport:
        """A plotly figure (rendered by the inlined plotly.js)."""
        self.n_figures += 1
        div = fig.to_html(full_html=False, include_plotlyjs=False,
                          div_id=f"figure-{self.n_figures}", config={"displaylogo": False})
        cap = f'<div class="caption">{html.escape(caption)}</div>' if caption else ""
        self.parts.append(f'<div class="figure">{div}{cap}</div>')
        return self

    def circuit(self, circuit: Any, evaluation: Any = None, curve: Any = None,
                token_node: str | None = None, title: str = "Circuit", top: int = 15) -> HtmlReport:
        """A circuit section: what was found, its faithfulness, the circuit figure, the token
        parts over the image (``token_node``, for graphs split by tokens), the faithfulness
        curves and a table of its strongest edges. Takes a `patchlens.circuits.Circuit`, its
        `CircuitEvaluation` and a `FaithfulnessCurve` (each optional but the circuit)."""
        self.heading(title)
        g = circuit.graph
        self.text(f"{circuit.n_edges} of {g.n_edges} edges ({100 * circuit.fraction:.1f}%) of "
                  f"the graph: {g!r}.")
        if evaluation is not None:
            self.text(f"Faithfulness {evaluation.faithfulness:.3f} ({evaluation.ablation} "
                      "ablation of every edge outside the circuit; 1 = the circuit alone gives "
                      "the full model's metric, 0 = no better than ablating everything).")
            if evaluation.divergence is not None:
                self.text(f"Divergence of the ablated runs: {evaluation.divergence.summary()}")
        self.figure(circuit.plot(), "edge width: |score|; red positive, blue negative; q "
                    "dotted, k dashed, v / MLP / output solid")
        if token_node is not None:
            self.figure(circuit.plot_tokens(token_node), f"{token_node}'s token parts: summed "
                        "|score| of their edges in the circuit")
        if curve is not None:
            self.figure(curve.plot(), "faithfulness of each method's top-k circuit; dashed: "
                        "random circuits of the same size")
        table = circuit.to_pandas()
        if "value" in table:
            table = table.reindex(table.value.abs().sort_values(ascending=False).index)
        return self.table(table.head(top), "strongest edges of the circuit")

    def to_html(self, plotlyjs: str = "inline") -> str:
        """The page; ``plotlyjs``: ``"inline"`` (offline) or ``"cdn"`` (see the module doc)."""
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style>"
            f"{_plotlyjs_tag(plotlyjs)}</head><body>"
            f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self.parts) + "</body></html>"
        )

    def save(self, path: str | Path, plotlyjs: str = "inline") -> Path:
        path = Path(path)
        page = self.to_html(plotlyjs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
        return path


PLOTLYJS = ("inline", "cdn")


def _plotlyjs_tag(mode: str) -> str:
    """The ``<script>`` that provides plotly.js: the library itself, or a CDN reference with the
    bundled version's subresource-integrity hash."""
    import base64
    import hashlib

    from plotly.offline import get_plotlyjs, get_plotlyjs_version

    if mode == "inline":
        return f"<script type='text/javascript'>{get_plotlyjs()}</script>"
    if mode == "cdn":
        url = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"
        sri = base64.b64encode(hashlib.sha384(get_plotlyjs().encode()).digest()).decode()
        return (f"<script charset='utf-8' src='{url}' integrity='sha384-{sri}' "
                "crossorigin='anonymous'></script>")
    from patchlens.errors import InputError

    raise InputError(f"plotlyjs must be one of {PLOTLYJS}, got {mode!r}.")


def __getattr__(name: str):
    """``Report``: the name of `HtmlReport` before 0.2 (a `DeprecationWarning`; the divergence
    result is `patchlens.diagnostics.DivergenceReport`)."""
    if name == "Report":
        import warnings

        warnings.warn("patchlens.report.Report is now HtmlReport (the divergence result is "
                      "DivergenceReport).", DeprecationWarning, stacklevel=2)
        return HtmlReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

