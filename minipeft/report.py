"""Turning study records into a table, a CSV, figures and a one-page HTML report.

Every number printed here is read from the ``RunRecord``s the study measured; nothing is
typed in. Rows aggregate seeds as mean (and ± the standard deviation where there are several).
"""

from __future__ import annotations

import base64
import csv
import html
import statistics
from pathlib import Path

COLUMNS = [  # (header, how to read it from a record)
    ("method", lambda r: r.method),
    ("family", lambda r: r.family),
    ("trainable", lambda r: r.trainable),
    ("trainable %", lambda r: r.trainable_pct),
    ("adapter KB", lambda r: r.adapter_bytes / 1024),
    ("peak step MB", lambda r: r.memory["measured"]["peak_step"] / 2**20),
    ("grads+opt MB", lambda r: (r.memory["predicted"]["gradients"]
                                + r.memory["predicted"]["optimizer"]) / 2**20),
    ("step ms", lambda r: r.step_ms),
    ("tokens/s", lambda r: r.tokens_per_s),
    ("task B EM", lambda r: 100 * r.b_em),
    ("task A EM before", lambda r: 100 * r.a_em_before),
    ("task A EM after", lambda r: 100 * r.a_em_after),
    ("forgetting (pts)", lambda r: 100 * r.forgetting),
    ("A EM at matched B", lambda r: None if r.a_em_at_match is None else 100 * r.a_em_at_match),
    ("ms/token (gen)", lambda r: r.gen_ms_per_token),
    ("lr", lambda r: r.lr),
]


def _by_method(records) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault(r.method, []).append(r)
    return groups


def _agg(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    if isinstance(values[0], str):
        return values[0], None
    mean = statistics.mean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(mean, std) -> str:
    if mean is None:
        return "-"
    if isinstance(mean, str):
        return mean
    digits = 0 if abs(mean) >= 100 else 1 if abs(mean) >= 10 else 2 if abs(mean) >= 0.01 else 4
    text = f"{mean:,.{digits}f}" if abs(mean) >= 1e-4 or mean == 0 else f"{mean:.0e}"
    return text + (f" ± {std:.{digits}f}" if std else "")


def summary_rows(records) -> list[list[str]]:
    rows = []
    for recs in _by_method(records).values():
        rows.append([_fmt(*_agg([get(r) for r in recs])) for _, get in COLUMNS])
    return rows


def markdown_table(records) -> str:
    head = [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(records)]
    return "\n".join(lines)


def write_csv(records, path) -> None:
    """One row per (method, seed), unaggregated."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed"] + [h for h, _ in COLUMNS])
        for r in records:
            w.writerow([r.seed] + [get(r) for _, get in COLUMNS])


# ---------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FAMILY_COLOURS = {"selective": "tab:blue", "reparameterisation": "tab:red",
                  "additive": "tab:green"}


def plot_learned_vs_forgotten(records, path) -> None:
    """One point per (method, seed): task-B accuracy gained vs task-A accuracy lost."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    clusters: list[tuple[float, float, list[str]]] = []   # methods whose means nearly coincide
    for method, recs in _by_method(records).items():
        colour = FAMILY_COLOURS.get(recs[0].family, "gray")
        ax.scatter([100 * r.forgetting for r in recs], [100 * r.b_em for r in recs],
                   color=colour, s=40, alpha=0.8)
        x = 100 * statistics.mean(r.forgetting for r in recs)
        y = 100 * statistics.mean(r.b_em for r in recs)
        near = [c for c in clusters if abs(c[0] - x) < 6 and abs(c[1] - y) < 6]
        if near:
            near[0][2].append(method)
        else:
            clusters.append((x, y, [method]))
    placed: list[float] = []
    for x, y, names in clusters:            # one label per cluster, inside the axes, unstacked
        right, top = x > 60, y > 60
        k = sum(abs(y - py) < 12 for py in placed)          # labels already at this height
        placed.append(y)
        ax.annotate(", ".join(names), (x, y), fontsize=8, ha="right" if right else "left",
                    va="top" if top else "bottom", textcoords="offset points",
                    xytext=(-6 if right else 6, (-6 - 12 * k) if top else (6 + 12 * k)))
    for fam, colour in FAMILY_COLOURS.items():
        ax.scatter([], [], color=colour, label=fam)
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("forgotten: task-A exact match lost (points)")
    ax.set_ylabel("learned: task-B exact match (%)")
    ax.set_title("Learned vs forgotten (one point per method and seed)")
    ax.axvline(0, color="k", lw=0.5)
    ax.legend(loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(records, path) -> None:
    """Stacked bars: weights / gradients / optimizer / activations (predicted), and the
    measured step peak as a marker."""
    plt = _plt()
    groups = _by_method(records)
    names = list(groups)
    parts = ["weights", "gradients", "optimizer", "activations"]
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(names)), 4.5))
    bottom = [0.0] * len(names)
    for part in parts:
        vals = [groups[n][0].memory["predicted"][part] / 2**20 for n in names]
        ax.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.scatter(names, [groups[n][0].memory["measured"]["peak_step"] / 2**20 for n in names],
               color="k", marker="_", s=300, label="measured step peak", zorder=3)
    ax.set_ylabel("MB")
    ax.set_title("Memory of one training step")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(records, path, value, ylabel: str, title: str, log: bool = False) -> None:
    plt = _plt()
    groups = _by_method(records)
    names = list(groups)
    vals = [statistics.mean(value(r) for r in groups[n]) for n in names]
    colours = [FAMILY_COLOURS.get(groups[n][0].family, "gray") for n in names]
    fig, ax = plt.subplots(figsize=(max(7, 0.7 * len(names)), 4))
    ax.bar(names, vals, color=colours)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(records, path) -> None:
    """Task-B (solid) and task-A (dashed) exact match over training, first seed of each."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    by_method = _by_method(records)
    colours = plt.get_cmap("tab20").colors    # 20 distinct colours: no two methods share one
    for i, (method, recs) in enumerate(by_method.items()):
        pts = [p for p in recs[0].curve if p.get("b_em") is not None]
        steps = [p["step"] for p in pts]
        colour = colours[(2 * i) % 20 + (2 * i) // 20]   # the dark shades first, then the light
        axes[0].plot(steps, [100 * p["b_em"] for p in pts], label=method, color=colour)
        axes[1].plot([p["step"] for p in recs[0].curve],
                     [100 * p["a_em"] for p in recs[0].curve], "--", color=colour)
    axes[0].set_title("learning task B")
    axes[1].set_title("remembering task A (adapter active)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("exact match (%)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_figures(records, out: Path) -> dict[str, Path]:
    figs = {
        "learned_vs_forgotten": out / "learned_vs_forgotten.png",
        "memory": out / "memory.png",
        "step_time": out / "step_time.png",
        "trainable": out / "trainable_percent.png",
        "curves": out / "learning_curves.png",
    }
    plot_learned_vs_forgotten(records, figs["learned_vs_forgotten"])
    plot_memory(records, figs["memory"])
    plot_bars(records, figs["step_time"], lambda r: r.step_ms, "ms per step",
              "Training step time")
    plot_bars(records, figs["trainable"], lambda r: r.trainable_pct, "trainable % (log)",
              "Parameter efficiency", log=True)
    plot_curves(records, figs["curves"])
    return figs


def method_sentence(recs) -> str:
    """One plain sentence per method, from its numbers."""
    r0 = recs[0]
    b = statistics.mean(r.b_em for r in recs)
    f = statistics.mean(r.forgetting for r in recs)
    learned = "learned task B well" if b >= 0.9 else "learned task B partly" if b >= 0.3 \
        else "barely learned task B"
    forgot = "forgot little of task A" if f <= 0.05 else "forgot part of task A" if f <= 0.5 \
        else "forgot most of task A"
    return (f"{r0.method} ({r0.family}, {r0.trainable_pct:.3g}% trainable) {learned} "
            f"({100 * b:.0f}%) and {forgot} ({100 * f:.0f} points lost).")


def _img(p: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"'


def lead_html(lead: dict | None) -> str:
    """A section placed before the synthetic study: ``lead`` holds a ``title``, a ``text`` (the
    verdict), ``head`` and ``rows`` (table cells), ``notes`` and a ``figure`` path."""
    if not lead:
        return ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in lead["head"])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in lead["rows"])
    return (f"<h2>{html.escape(lead['title'])}</h2><p><b>{html.escape(lead['text'])}</b></p>"
            f"<figure>{_img(Path(lead['figure']))} alt=\"real-text paths\"><figcaption>"
            f"{html.escape(lead.get('caption', ''))}</figcaption></figure>"
            f"<p>{html.escape(lead.get('notes', ''))}</p><table><tr>{head}</tr>{body}</table>"
            "<h2>The synthetic study</h2>")


def write_html(records, figs: dict, path: Path, title: str, notes: str = "",
               lead: dict | None = None) -> None:
    imgs = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"'
        f' alt="{k}"><figcaption>{k.replace("_", " ")}</figcaption></figure>'
        for k, p in figs.items())
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in summary_rows(records))
    sentences = "".join(f"<li>{html.escape(method_sentence(recs))}</li>"
                        for recs in _by_method(records).values())
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8">
<title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:3px 6px}}
img{{max-width:100%}}figure{{display:inline-block;max-width:48%;margin:0.5em}}
</style></head><body><h1>{html.escape(title)}</h1>{lead_html(lead)}<p>{html.escape(notes)}</p>
<table><tr>{head}</tr>{body}</table><h2>In one sentence each</h2><ul>{sentences}</ul>
<h2>Figures</h2>{imgs}</body></html>""")


def write_report(records, out, title: str = "minipeft: every method side by side",
                 notes: str = "", lead: dict | None = None) -> dict:
    """Table (markdown), CSV, figures and the HTML page into ``out``; returns the paths.
    ``lead`` (see :func:`lead_html`) puts another study's section first."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown_table(records) + "\n")
    write_csv(records, out / "results.csv")
    figs = write_figures(records, out)
    write_html(records, figs, out / "report.html", title, notes, lead)
    return {"table": out / "table.md", "csv": out / "results.csv",
            "html": out / "report.html", **figs}
