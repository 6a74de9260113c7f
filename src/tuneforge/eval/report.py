"""The evaluation report: ``report.md`` and a self-contained ``report.html`` in the run folder.

The report is built once as a list of blocks (heading, paragraph, table, image) from the
results that ``tuneforge eval`` saves in ``eval.json``, then written both as Markdown (images as
PNG files beside it) and as HTML with the same PNGs embedded as base64, so the HTML file alone
can be mailed or archived. Plots are drawn with matplotlib's object API (no global state).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

from tuneforge.eval.baselines import BASE_FEW, BASE_ZERO, GGUF, TUNED, TUNED_FEW
from tuneforge.files import write_atomic

SYSTEM_ORDER = (BASE_ZERO, BASE_FEW, TUNED, TUNED_FEW, GGUF)
COLORS = {
    BASE_ZERO: "#9e9e9e",
    BASE_FEW: "#5c6bc0",
    TUNED: "#ef6c00",
    TUNED_FEW: "#2e7d32",
    GGUF: "#8d6e63",
}


@dataclass
class Block:
    kind: str  # heading | text | table | image
    text: str = ""
    level: int = 2
    header: list[str] | None = None
    rows: list[list[str]] | None = None
    png: bytes = b""
    name: str = ""  # image file name


def _fmt(x, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def loss_curve_png(curves: dict) -> bytes | None:
    """Train and eval loss against step, with the best step marked."""
    from matplotlib.figure import Figure

    train, evals = curves.get("train") or [], curves.get("eval") or []
    if not train and not evals:
        return None
    fig = Figure(figsize=(7, 3.8))
    ax = fig.add_subplot()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", color="#1565c0")
    if evals:
        ax.plot(
            [s for s, _ in evals],
            [v for _, v in evals],
            "o-",
            label="eval loss",
            color="#ef6c00",
        )
    best = curves.get("best_step")
    if best:
        ax.axvline(best, color="#2e7d32", linestyle="--", label=f"best step ({best})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (cross-entropy per token)")
    values = [v for _, v in train] + [v for _, v in evals]
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # fine-tuning losses often fall by orders of magnitude
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Train and eval loss")
    return _figure_png(fig)


def metric_bars_png(scores: dict[str, dict[str, float]], metrics: list[str]) -> bytes | None:
    """Grouped bars: each metric, each system (base zero-/few-shot, fine-tuned, + few-shot)."""
    from matplotlib.figure import Figure

    systems = [s for s in SYSTEM_ORDER if s in scores]
    shown = [m for m in metrics if all(m in scores[s] for s in systems)]
    if not systems or not shown:
        return None
    fig = Figure(figsize=(max(5, 1.8 * len(shown) + 2), 3.8))
    ax = fig.add_subplot()
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(shown))]
        values = [scores[system][m] for m in shown]
        bars = ax.bar(xs, values, width, label=system, color=COLORS.get(system))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(shown)), shown)
    ax.set_ylabel("score")
    top = max(scores[s][m] for s in systems for m in shown)
    ax.set_ylim(0, max(1.0, top) * 1.12)  # room for the bar labels
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(systems))
    ax.set_title("Task metrics: prompting baselines vs fine-tuned")
    return _figure_png(fig)


def build_blocks(r: dict) -> list[Block]:
    """The report's content, shared by the Markdown and the HTML output."""
    b: list[Block] = [Block("heading", f"Evaluation of {r['run']}", level=1)]
    b.append(
        Block(
            "text",
            f"Base model `{r['model']}`, method {r['method']}. {r['examples']} held-out examples "
            f"from `{r['data']}`; the same decoding for every system (max_new_tokens "
            f"{r['decoding']['max_new_tokens']}, temperature {r['decoding']['temperature']}); "
            f"few-shot prompts hold {r['few_shot_k']} training examples.",
        )
    )
    b.append(Block("heading", "Fine-tune or just prompt?"))
    b.append(Block("text", r["verdict"]["text"]))
    systems = [s for s in SYSTEM_ORDER if s in r["scores"]]
    names = [m for m in r["metrics"] if any(m in r["scores"][s] for s in systems)]
    b.append(
        Block(
            "table",
            header=["system", *names],
            rows=[[s, *(_fmt(r["scores"][s].get(m)) for m in names)] for s in systems],
        )
    )
    png = metric_bars_png(r["scores"], [m for m in names if m not in ("eval_loss", "perplexity")])
    if png:
        b.append(Block("image", "Task metrics per system", png=png, name="eval_metrics.png"))

    if r.get("gguf"):
        b.append(Block("heading", "The exported file"))
        b.append(Block("text", r["gguf"]["text"]))

    b.append(Block("heading", "Forgetting"))
    f = r.get("forgetting")
    if f:
        b.append(Block("text", f["text"]))
        b.append(
            Block(
                "table",
                header=["model", "perplexity on general text", "tokens"],
                rows=[
                    ["base", _fmt(f["base_perplexity"], 3), str(f["tokens"])],
                    ["fine-tuned", _fmt(f["fine_tuned_perplexity"], 3), str(f["tokens"])],
                ],
            )
        )
    else:
        b.append(Block("text", "Not measured (eval.general_text is none)."))

    b.append(Block("heading", "Overfitting"))
    o = r["overfitting"]
    b.append(Block("text", o["text"]))
    if o["evaluations"]:
        b.append(
            Block(
                "table",
                header=["step", "eval loss", "gap (eval - train)"],
                rows=[
                    [str(s), _fmt(v, 4), _fmt(dict(o["gaps"]).get(s), 4)]
                    for s, v in o["curves"]["eval"]
                ],
            )
        )
    png = loss_curve_png(o["curves"])
    if png:
        b.append(Block("image", "Train and eval loss", png=png, name="eval_loss_curves.png"))

    if r.get("advice"):  # eval.json files written before the advice have none
        b.append(Block("heading", "Advice"))
        b.extend(Block("text", line) for line in r["advice"])

    if r.get("review"):
        b.append(Block("heading", "Human review"))
        b.append(Block("text", r["review"]["text"]))

    n = min(r.get("report_examples", 5), len(r["references"]))
    if n:
        b.append(Block("heading", "Outputs side by side"))
        header = ["prompt", "reference", *systems]
        rows = [
            [
                r["prompts"][i],
                r["references"][i],
                *(r["predictions"][s][i] for s in systems),
            ]
            for i in range(n)
        ]
        b.append(Block("table", header=header, rows=rows))
    if r.get("timing"):
        b.append(Block("heading", "Timing"))
        b.append(
            Block(
                "table",
                header=["step", "seconds"],
                rows=[[k, f"{v:.1f}"] for k, v in r["timing"].items()],
            )
        )
    return b


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or " "


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for blk in blocks:
        if blk.kind == "heading":
            out.append("#" * blk.level + " " + blk.text)
        elif blk.kind == "text":
            out.append(blk.text)
        elif blk.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in blk.header) + " |")
            out[-1] += "\n|" + " --- |" * len(blk.header)
            for row in blk.rows:
                out[-1] += "\n| " + " | ".join(_md_cell(c) for c in row) + " |"
        elif blk.kind == "image":
            out.append(f"![{blk.text}]({blk.name})")
    return "\n\n".join(out) + "\n"


CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top;white-space:pre-wrap}
th{background:#eee}
img{max-width:100%;display:block;margin:1em 0}
code{background:#f4f4f4;padding:0 3px}
"""


def _html_text(text: str) -> str:
    # Render `code` spans; everything else is escaped.
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: list[Block], title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    for blk in blocks:
        if blk.kind == "heading":
            out.append(f"<h{blk.level}>{_html_text(blk.text)}</h{blk.level}>")
        elif blk.kind == "text":
            out.append(f"<p>{_html_text(blk.text)}</p>")
        elif blk.kind == "table":
            out.append("<table><thead><tr>")
            out.append("".join(f"<th>{html.escape(str(h))}</th>" for h in blk.header))
            out.append("</tr></thead><tbody>")
            for row in blk.rows:
                out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row))
                out.append("</tr>")
            out.append("</tbody></table>")
        elif blk.kind == "image":
            data = base64.b64encode(blk.png).decode("ascii")
            alt = html.escape(blk.text)
            out.append(f'<img alt="{alt}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dir: str | Path, results: dict) -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into the run folder (each via a temp file).

    Returns:
        name -> path of every file written.
    """
    run_dir = Path(run_dir)
    blocks = build_blocks(results)
    files: dict[str, bytes] = {}
    for blk in blocks:
        if blk.kind == "image":
            files[blk.name] = blk.png
    files["report.md"] = to_markdown(blocks).encode("utf-8")
    files["report.html"] = to_html(blocks, f"tuneforge eval: {results['run']}").encode("utf-8")
    written = {}
    for name, data in files.items():
        written[name] = write_atomic(run_dir / name, data)
    return written
