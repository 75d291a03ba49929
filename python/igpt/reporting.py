"""Reports of a probe run: Markdown tables, the JSON record, the accuracy-vs-depth figure.

    paths = write_report(results, out_dir)   # probe.json, probe.md, depth.png
    text = summary_text(results)            # the Markdown that probe.md holds

``results`` is what ``igpt.evaluation.evaluate`` returns. ``figure()`` makes every figure the
package draws: a ``matplotlib.figure.Figure`` of its own, saved to a file, never through
pyplot, so igpt neither switches the backend of a notebook or application that imports it
nor leaves figures open in pyplot's state; ``format_table`` is the one Markdown table, used
by the reports and the benchmarks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from igpt._io import atomic_write, atomic_write_text


def figure(**kwargs):
    """A new ``matplotlib.figure.Figure(**kwargs)`` (``figsize``, ``dpi`` ...), outside
    pyplot: ``fig.savefig`` writes it with the backend for the file's format, whatever
    backend the importing program uses, and nothing is left to close."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


class _Figures:
    """pyplot's ``figure``, ``subplots`` and ``close``, on ``figure()``'s Figure objects."""

    figure = staticmethod(figure)

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, **kwargs):
        keys = ("figsize", "dpi", "layout", "facecolor")
        fig = figure(**{k: kwargs.pop(k) for k in keys if k in kwargs})
        return fig, fig.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def close(fig=None) -> None:
        """Nothing to close: the figure is not in pyplot's state."""


def pyplot() -> _Figures:
    """For drawing code written against pyplot: its ``figure``, ``subplots`` and ``close``
    on ``figure()``'s Figure objects (no backend switch, no pyplot state)."""
    return _Figures()


def format_table(rows: Sequence[dict], columns: Sequence[str], *, float_format=".4f") -> str:
    """A Markdown table of ``rows`` (dicts) restricted to ``columns``.

    Floats are written with ``float_format``, lists and tuples comma-joined, None as blank.
    """

    def fmt(v):
        if isinstance(v, float):
            return f"{v:{float_format}}"
        if isinstance(v, (list, tuple)):
            return ",".join(str(i) for i in v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_accuracy_vs_depth(
    curves: dict,
    path,
    *,
    n_layer: int | None = None,
    baselines: dict | None = None,
    title: str = "Linear probe accuracy vs depth",
) -> Path:
    """The paper's figure 2: probe accuracy against relative depth l / L, as a PNG.

    Args:
        curves: name -> ``probe_layers`` result (or its ``rows``); one line per name.
        path: the PNG to write.
        n_layer: L, the model's depth (default: the largest layer in the rows).
        baselines: name -> accuracy, drawn as horizontal dashed lines (e.g. raw pixels).
    """
    fig = figure(figsize=(6, 4), dpi=120)
    ax = fig.subplots()
    for name, res in curves.items():
        rows = res["rows"] if isinstance(res, dict) else res
        layers = [r["layer"] for r in rows]
        depth = max(n_layer or max(layers), 1)
        ax.plot(
            [lay / depth for lay in layers],
            [100 * r["test_acc"] for r in rows],
            marker="o",
            markersize=3,
            label=name,
        )
    for i, (name, acc) in enumerate((baselines or {}).items()):
        ax.axhline(100 * acc, linestyle="--", color=f"C{len(curves) + i}", label=name)
    ax.set_xlabel("relative depth l / L")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return Path(path)


def jsonable(obj):
    """``obj`` with numpy scalars as Python numbers and fitted classifiers left out."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items() if k != "classifier"}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


PROBE_NAMES = {"layers": "linear", "attentive": "attentive", "knn": "k-NN"}


def depth_figure(results: dict, path, *, title: str = "Linear probe accuracy vs depth") -> Path:
    """``plot_accuracy_vs_depth`` of a probe run: the model (one line per probe that ran:
    linear, attentive, k-NN), the random init, raw pixels."""
    ran = [k for k in PROBE_NAMES if results.get(k)]
    several = len(ran) > 1 or ran != ["layers"]
    curves = {
        (f"pretrained, {PROBE_NAMES[k]}" if several else "pretrained"): results[k] for k in ran
    }
    if several and title == "Linear probe accuracy vs depth":
        title = "Probe accuracy vs depth"
    if results.get("random_init"):
        curves["random init, linear" if several else "random init"] = results["random_init"]
    baselines = {}
    if results.get("raw_pixels"):
        baselines["raw pixels"] = results["raw_pixels"]["test_acc"]
    return plot_accuracy_vs_depth(
        curves, path, n_layer=results.get("n_layer"), baselines=baselines, title=title
    )


def write_report(results: dict, out_dir) -> dict:
    """Write ``probe.json``, ``probe.md`` (tables) and ``depth.png`` for a probe run.

    ``results`` holds ``layers`` (a ``probe_layers`` result) and optionally ``random_init``
    (the same for the baseline model), ``raw_pixels`` (a ``linear_probe`` result),
    ``low_data`` (a ``low_data_probe`` result) and ``bert_ensemble``. Returns the paths.
    """
    out = Path(out_dir)
    paths = {"json": out / "probe.json", "table": out / "probe.md", "png": out / "depth.png"}
    atomic_write_text(paths["json"], json.dumps(jsonable(results), indent=2))
    atomic_write_text(paths["table"], summary_text(results) + "\n")
    depth_figure(results, paths["png"])
    return paths


def _low_data_table(low: dict, name: str | None = None) -> list[dict]:
    return [
        {
            **({"features": name} if name else {}),
            "per class": r["per_class"],
            "n_train": r["n_train"],
            "test acc": f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}",
        }
        for r in low["rows"]
    ]


def _subset_count(results: dict) -> str:
    """How many random subsets each low-data probe averaged ("5", or "3-5" if they differ)."""
    lows = [results.get("low_data"), *(results.get("low_data_baselines") or {}).values()]
    counts = sorted({len(r["accs"]) for low in lows if low for r in low["rows"]})
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"


def probes_table(results: dict) -> str:
    """Markdown: the test accuracy of every probe that ran, one row per layer, and the best
    layer of each (chosen on its hold-out)."""
    ran = [k for k in PROBE_NAMES if results.get(k)]
    by_layer: dict[int, dict] = {}
    for k in ran:
        for r in results[k]["rows"]:
            by_layer.setdefault(r["layer"], {"layer": r["layer"]})[PROBE_NAMES[k]] = r["test_acc"]
    best = {"layer": "best (hold-out)"}
    for k in ran:
        b = results[k]
        best[PROBE_NAMES[k]] = f"{b['best']['test_acc']:.4f} (layer {b['best_layer']})"
    rows = [by_layer[layer] for layer in sorted(by_layer)] + [best]
    return format_table(rows, ["layer", *(PROBE_NAMES[k] for k in ran)])


def _other_probes_text(results: dict) -> list[str]:
    """The attentive and k-NN sections of ``summary_text``, and the three side by side."""
    parts = []
    if results.get("attentive"):
        a = results["attentive"]
        parts += [
            "",
            f"## Attentive probe per layer ({a.get('tokens', '?')} tokens per image)",
            "",
            format_table(a["rows"], ["layer", "val_acc", "test_acc", "epoch"]),
        ]
    if results.get("knn"):
        parts += [
            "",
            "## k-NN probe per layer",
            "",
            format_table(results["knn"]["rows"], ["layer", "val_acc", "test_acc", "k"]),
        ]
    if sum(bool(results.get(k)) for k in PROBE_NAMES) > 1:
        parts += ["", "## Probes side by side (test accuracy)", "", probes_table(results)]
    return parts


def summary_text(results: dict) -> str:
    """The Markdown summary of a probe run: per-layer table, baselines, low-data, BERT, and
    the attentive and k-NN probes."""
    if not results.get("layers"):  # no linear probe: the others alone
        return "\n".join(_other_probes_text(results)).strip()
    rows = results["layers"]["rows"]
    reg = "C" if rows and "C" in rows[0] else "weight_decay"
    parts = [
        "## Linear probe per layer",
        "",
        format_table(rows, ["layer", "val_acc", "test_acc", reg]),
    ]
    lay = results["layers"]
    lines = [f"best layer {lay['best_layer']}: test acc {lay['best']['test_acc']:.4f}"]
    if lay.get("concat"):
        c = lay["concat"]
        lines.append(f"concat of layers {c['layers']}: test acc {c['test_acc']:.4f}")
    if results.get("random_init"):
        r = results["random_init"]
        lines.append(
            f"random-init model, best layer {r['best_layer']}: test acc {r['best']['test_acc']:.4f}"
        )
    if results.get("raw_pixels"):
        raw = results["raw_pixels"]
        seen = f" ({raw['pixels']})" if raw.get("pixels") else ""  # images, or palette colours
        lines.append(f"raw pixels{seen}: test acc {raw['test_acc']:.4f}")
    if results.get("bert_ensemble"):
        b = results["bert_ensemble"]
        lines.append(
            f"BERT layer {b['layer']}: one mask {b['single_mask_acc']:.4f}, "
            f"{b['n_masks']}-mask ensemble {b['ensemble_acc']:.4f}"
        )
    parts += ["", *(f"- {line}" for line in lines)]
    low_rows = _low_data_table(results["low_data"]) if results.get("low_data") else []
    columns = ["per class", "n_train", "test acc"]
    if results.get("low_data_baselines"):  # the same subsets probed on every feature set
        low_rows = _low_data_table(results.get("low_data") or {"rows": []}, "pretrained")
        for name, low in results["low_data_baselines"].items():
            low_rows += _low_data_table(low, name)
        columns = ["features", *columns]
    if low_rows:
        subsets = _subset_count(results)
        parts += [
            "",
            f"## Low-data probe (test accuracy, mean ± std over {subsets} random subsets, %)",
            "",
            format_table(low_rows, columns),
        ]
    return "\n".join(parts + _other_probes_text(results))
