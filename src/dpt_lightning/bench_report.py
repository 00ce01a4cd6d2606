"""Aggregation of a benchmark's results.csv into summary.md and plots.

Conventions (also stated at the top of every summary):

* accuracy is the overall (micro) top-1 accuracy in percent;
* ``±`` is the SAMPLE standard deviation over seeds (``ddof=1``); a value from one seed has none;
* a dataset's value is the mean over its seeds; the *average* over datasets is the mean of those
  per-dataset means, and its ``±`` is the sample std over seeds of the per-seed averages (seeds
  that every dataset has);
* a method that learns nothing (zero-shot) has one value per dataset, shown at every shot count;
* base-to-novel: per dataset, HM = 2·B·N / (B + N) of the dataset's mean base accuracy B and mean
  novel accuracy N (the true harmonic mean). Averaged over datasets it is given two ways:
  "HM of averages" (HM of the average B and average N, the convention of CoCoOp-style tables) and
  "mean of HMs" (the mean of the per-dataset HMs). "(B+N)/2" is the plain arithmetic mean, shown
  only because one reference reports it under the name HM; it is not a harmonic mean. Every
  average is given with and without BUSI, whose novel set is one class (100% by construction).
"""
from __future__ import annotations

import datetime as dt
import math
from functools import partial
from pathlib import Path

import pandas as pd

#: Published averages (methods.md), keyed by the method's config name in trainers/.
PUBLISHED_FEWSHOT = {  # accuracy (%) averaged over the 11 datasets and 3 seeds, by shots
    "biomed_dpt": ("Biomed-DPT", {1: 59.03, 2: 61.27, 4: 66.12, 8: 70.76, 16: 73.51}),
    "biomed_coop": ("BiomedCoOp", {1: 57.03, 2: 59.13, 4: 63.95, 8: 68.32, 16: 72.42}),
    "coop": ("CoOp", {1: 50.16, 2: 54.18, 4: 59.75, 8: 65.84, 16: 69.62}),
    "zeroshot": ("zero-shot BiomedCLIP (approx.)", {k: 42.0 for k in (1, 2, 4, 8, 16)}),
    "zeroshot_ensemble": ("zero-shot, 50-sentence ensemble (approx.)", {k: 56.0 for k in (1, 2, 4, 8, 16)}),
}
PUBLISHED_BASE2NOVEL = {  # (label, base %, novel %), averaged over the datasets
    "biomed_dpt": ("Biomed-DPT", 78.06, 75.97),
    "biomed_coop": ("BiomedCoOp (10 datasets)", 76.26, 73.92),
    "coop": ("CoOp", 73.85, 64.75),
    "zeroshot": ("zero-shot BiomedCLIP", 47.84, 65.42),
}
EXCLUDED_FOR_NOVEL = "BUSI"
METRIC_COLUMNS = ("acc", "macro_acc", "f1", "auroc", "novel_acc", "novel_macro_acc", "novel_f1", "novel_auroc",
                  "train_seconds", "eval_seconds", "total_seconds", "peak_rss_mb", "cuda_max_allocated_mb",
                  "trainable_params", "checkpoint_bytes")


# ----------------------------------------------------------------------- arithmetic
def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for fewer than 2 values) and count."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, std, n


def harmonic_mean(base: float, novel: float) -> float:
    """The true harmonic mean 2·B·N / (B + N) (0 when both are 0)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def frame(rows: list[dict]) -> pd.DataFrame:
    """The finished rows as a table: numbers as floats, accuracies in percent, shots/seed as floats
    (NaN for a method that learns nothing)."""
    table = pd.DataFrame([r for r in rows if r.get("status") == "ok"])
    for column in ("method", "dataset", "protocol"):
        if column not in table:
            table[column] = pd.Series(dtype=str)
    for column in (*METRIC_COLUMNS, "shots", "seed"):
        table[column] = pd.to_numeric(table[column], errors="coerce") if column in table else math.nan
    for column in ("acc", "novel_acc", "macro_acc", "f1", "novel_f1"):
        if column in table:
            table[column] = table[column] * 100
    return table


def with_shots(table: pd.DataFrame, shots: list[int]) -> pd.DataFrame:
    """Rows of test-only methods (no shots) repeated at every shot count of the grid."""
    fixed = table[table["shots"].isna()]
    repeated = [fixed.assign(shots=float(k)) for k in shots]
    return pd.concat([table[table["shots"].notna()], *repeated], ignore_index=True)


def per_dataset(table: pd.DataFrame, column: str, keys: list[str]) -> dict[tuple, tuple[float, float, int]]:
    """``keys + [dataset]`` -> (mean, sample std, n) of ``column`` over seeds."""
    out = {}
    for key, group in table.groupby([*keys, "dataset"], dropna=False, sort=False):
        out[key] = mean_std(group[column])
    return out


def average_over_datasets(table: pd.DataFrame, column: str, datasets: list[str]) -> tuple[float, float, int]:
    """Mean of the per-dataset means of ``column`` (datasets present), the sample std over seeds
    of the per-seed averages (seeds present in every dataset) and the number of datasets."""
    table = table[table["dataset"].isin(datasets)]
    means = [mean_std(group[column])[0] for _, group in table.groupby("dataset", sort=False)]
    if not means:
        return math.nan, math.nan, 0
    present = table["dataset"].nunique()
    seed_key = table["seed"].fillna(-1)
    per_seed = [group[column].mean() for _, group in table.groupby(seed_key)
                if group["dataset"].nunique() == present]
    return sum(means) / len(means), mean_std(per_seed)[1], len(means)


def base2novel_average(table: pd.DataFrame, datasets: list[str]) -> dict[str, float]:
    """Average base and novel accuracy of one method over ``datasets`` and the three "HM"s."""
    base, novel, hms = [], [], []
    for name in datasets:
        rows = table[table["dataset"] == name]
        b, n = mean_std(rows["acc"])[0], mean_std(rows["novel_acc"])[0]
        if math.isnan(b) or math.isnan(n):
            continue
        base.append(b)
        novel.append(n)
        hms.append(harmonic_mean(b, n))
    if not base:
        return {}
    b, n = sum(base) / len(base), sum(novel) / len(novel)
    return {"base": b, "novel": n, "hm_of_averages": harmonic_mean(b, n), "mean_of_hms": sum(hms) / len(hms),
            "arithmetic": (b + n) / 2, "datasets": len(base)}


# --------------------------------------------------------------------------- format
def cell(mean: float, std: float = math.nan, n: int | None = None, expected: int | None = None) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    text = f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"
    if expected and n is not None and n < expected:
        text += f" ({n}/{expected})"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def show_published(grid, datasets: list[str]) -> bool:
    if grid.published in ("true", "false"):
        return grid.published == "true"
    from dpt_lightning.data.facts import BENCHMARK_DATASETS

    known = {name.lower() for name in BENCHMARK_DATASETS}
    return any(name.lower() in known for name in datasets)


# ------------------------------------------------------------------------- sections
def fewshot_section(grid, table: pd.DataFrame, published: bool) -> tuple[str, dict]:
    """Markdown of the few-shot tables and the plotted series {method: {K: (mean, std)}}."""
    shots = grid.shots["fewshot"]
    table = with_shots(table[table["protocol"] == "fewshot"], shots)
    methods = [m.name for m in grid.methods]
    datasets = [d.name for d in grid.datasets]
    seeds = len(grid.seeds)
    series: dict[str, dict[int, tuple[float, float]]] = {}
    rows = []
    for method in methods:
        values, row = {}, [method]
        for k in shots:
            mean, std, n = average_over_datasets(table[(table["method"] == method) & (table["shots"] == k)],
                                                 "acc", datasets)
            values[k] = (mean, std)
            row.append(cell(mean, std, n, len(datasets)))
        series[method] = values
        means = [v[0] for v in values.values() if not math.isnan(v[0])]
        row.append(cell(sum(means) / len(means)) if len(means) == len(shots) else "–")
        rows.append(row)
    if published:
        for key, (label, by_k) in PUBLISHED_FEWSHOT.items():
            rows.append([f"*published:* {label}"] + [cell(by_k.get(k, math.nan)) for k in shots]
                        + [cell(sum(by_k[k] for k in shots) / len(shots)) if all(k in by_k for k in shots) else "–"])
    parts = [f"## Few-shot: accuracy (%) averaged over {len(datasets)} dataset(s)\n",
             markdown_table(["method", *[f"K={k}" for k in shots], "mean over K"], rows)]
    if published:
        parts.append("\n*published* rows: the papers' averages over the 11 benchmark datasets and 3 seeds "
                     "(methods.md); comparable only with the same datasets, seeds and backbone.")
    for k in shots:
        cells = per_dataset(table[table["shots"] == k], "acc", ["method"])
        rows = []
        for method in methods:
            expected = seeds if next(m for m in grid.methods if m.name == method).fit else 1
            row = [method] + [cell(*cells.get((method, d), (math.nan, math.nan, 0)), expected) for d in datasets]
            mean, std, n = average_over_datasets(table[(table["method"] == method) & (table["shots"] == k)],
                                                 "acc", datasets)
            rows.append(row + [cell(mean, std, n, len(datasets))])
        parts += [f"\n### K = {k} shots: accuracy (%) per dataset, mean ± std over seeds\n",
                  markdown_table(["method", *datasets, "average"], rows)]
    return "\n".join(parts), series


def base2novel_section(grid, table: pd.DataFrame, published: bool) -> tuple[str, dict]:
    """Markdown of the base-to-novel tables and the plotted points {method: {dataset|"average": (B, N)}}."""
    table = table[table["protocol"] == "base2novel"]
    methods = [m.name for m in grid.methods]
    datasets = [d.name for d in grid.datasets]
    seeds = len(grid.seeds)
    without = [d for d in datasets if d.upper() != EXCLUDED_FOR_NOVEL]
    parts = []
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for title, column in (("base classes", "acc"), ("novel classes", "novel_acc")):
        cells = per_dataset(table, column, ["method"])
        rows = []
        for method in methods:
            expected = seeds if next(m for m in grid.methods if m.name == method).fit else 1
            row = [method] + [cell(*cells.get((method, d), (math.nan, math.nan, 0)), expected) for d in datasets]
            summary = base2novel_average(table[table["method"] == method], datasets)
            rows.append(row + [cell(summary.get("base" if column == "acc" else "novel", math.nan))])
        parts += [f"\n### Base-to-novel: accuracy (%) on the {title}, mean ± std over seeds\n",
                  markdown_table(["method", *datasets, "average"], rows)]
    rows = []
    for method in methods:
        mine = table[table["method"] == method]
        hms = []
        points[method] = {}
        for d in datasets:
            rows_d = mine[mine["dataset"] == d]
            b, n = mean_std(rows_d["acc"])[0], mean_std(rows_d["novel_acc"])[0]
            hms.append(cell(harmonic_mean(b, n)) if not (math.isnan(b) or math.isnan(n)) else "–")
            if hms[-1] != "–":
                points[method][d] = (b, n)
        average = base2novel_average(mine, datasets)
        if average:
            points[method]["average"] = (average["base"], average["novel"])
        rows.append([method, *hms, cell(average.get("mean_of_hms", math.nan))])
    parts += ["\n### Base-to-novel: harmonic mean HM = 2BN/(B+N) per dataset (of the seed means)\n",
              markdown_table(["method", *datasets, "mean of HMs"], rows)]
    for label, names in (("all datasets", datasets), ("without BUSI", without)):
        if label == "without BUSI" and len(names) == len(datasets):
            continue
        rows = []
        for method in methods:
            s = base2novel_average(table[table["method"] == method], names)
            rows.append([method, cell(s.get("base", math.nan)), cell(s.get("novel", math.nan)),
                         cell(s.get("hm_of_averages", math.nan)), cell(s.get("mean_of_hms", math.nan)),
                         cell(s.get("arithmetic", math.nan)), str(s.get("datasets", 0))])
        if published:
            for label_p, b, n in PUBLISHED_BASE2NOVEL.values():
                rows.append([f"*published:* {label_p}", cell(b), cell(n), cell(harmonic_mean(b, n)), "–",
                             cell((b + n) / 2), "11" if "10 datasets" not in label_p else "10"])
        parts += [f"\n### Base-to-novel averages ({label})\n",
                  markdown_table(["method", "base", "novel", "HM of averages", "mean of HMs", "(B+N)/2 (not an HM)",
                                  "datasets"], rows)]
    if published:
        parts.append("\n*published* rows: the papers' average base and novel accuracy (methods.md); their HM is "
                     "computed here from those averages. The references differ on BUSI (one includes it).")
    return "## Base-to-novel\n" + "\n".join(parts), points


def cost_section(grid, table: pd.DataFrame) -> str:
    """Per method: trainable parameters, checkpoint size, mean seconds, peak memory."""
    rows = []
    for method in [m.name for m in grid.methods]:
        mine = table[table["method"] == method]
        if mine.empty:
            continue

        def stat(column, how="mean", scale=1.0, digits=1):
            if column not in mine or mine[column].dropna().empty:
                return "–"
            value = getattr(mine[column].dropna(), how)() * scale
            return f"{value:,.{digits}f}"

        rows.append([method, stat("trainable_params", "max", digits=0), stat("checkpoint_bytes", "max", 1 / 1024),
                     stat("train_seconds"), stat("eval_seconds"), stat("peak_rss_mb", "max", digits=0),
                     stat("cuda_max_allocated_mb", "max", digits=0)])
    return ("## Cost per run\n\n" + markdown_table(
        ["method", "trainable params", "checkpoint KiB", "train s (mean)", "eval s (mean)", "peak RSS MiB (max)",
         "CUDA max allocated MiB"], rows))


def failures_section(rows: list[dict]) -> str:
    failed = [r for r in rows if r.get("status") != "ok"]
    if not failed:
        return ""
    lines = [f"- `{r['run_id']}`: {str(r.get('error', ''))[:300]}" for r in failed]
    return (f"## Failed runs ({len(failed)})\n\nLeft out of the tables above; rerun the grid with `--resume` to "
            "retry them (details: `runs/<run id>/error.txt`).\n\n" + "\n".join(lines))


def summary_markdown(grid, rows: list[dict], folder: Path) -> tuple[str, dict, dict]:
    """The whole summary.md text, the few-shot series and the base-to-novel points."""
    table = frame(rows)
    datasets = [d.name for d in grid.datasets]
    published = show_published(grid, datasets)
    ok = sum(r.get("status") == "ok" for r in rows)
    header = [
        f"# Benchmark `{grid.name}`",
        "",
        f"Run folder `{folder.name}`; {ok} finished run(s) of this grid in `results.csv` "
        f"(methods: {', '.join(m.name for m in grid.methods)}; datasets: {', '.join(datasets)}; "
        f"seeds: {', '.join(map(str, grid.seeds))}; backbone: {', '.join(sorted(set(table.get('backbone', pd.Series(dtype=str)).dropna().astype(str)))) or '–'}).",
        "",
        "Accuracy is the overall (micro) top-1 accuracy in %, of the last epoch's model. `±` is the **sample** "
        "standard deviation over seeds (ddof = 1); a value from one seed has none. `(n/m)`: only n of the m "
        "expected seeds or datasets finished. Averages are means of the per-dataset means; a test-only method "
        "(zero-shot) has one value per dataset, shown at every K.",
    ]
    if not published:
        header.append("\nThe papers' published averages are not shown: this grid's datasets are not the benchmark's.")
    parts, series, points = ["\n".join(header)], {}, {}
    if "fewshot" in grid.protocols:
        text, series = fewshot_section(grid, table, published)
        parts.append(text)
    if "base2novel" in grid.protocols:
        text, points = base2novel_section(grid, table, published)
        parts.append(text)
    parts.append(cost_section(grid, table))
    failures = failures_section(rows)
    if failures:
        parts.append(failures)
    return "\n\n".join(parts) + "\n", series, points


# ---------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_shots(series: dict, path: Path, title: str, published: bool,
                           fixed: frozenset = frozenset()) -> Path | None:
    """Average accuracy against K per method (error bars: sample std over seeds); methods in
    ``fixed`` (test only) are dashed lines; published averages dotted."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8.0, 4.6))
    all_shots = sorted({k for values in series.values() for k in values})
    for method, values in series.items():
        ks = [k for k in sorted(values) if not math.isnan(values[k][0])]
        if not ks:
            continue
        means = [values[k][0] for k in ks]
        if method in fixed:
            ax.plot(ks, means, linestyle="--", label=f"{method} (no training)")
            continue
        stds = [0.0 if math.isnan(values[k][1]) else values[k][1] for k in ks]
        ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=method)
    if published:
        for label, by_k in PUBLISHED_FEWSHOT.values():
            ks = [k for k in all_shots if k in by_k]
            if ks:
                ax.plot(ks, [by_k[k] for k in ks], linestyle=":", marker="x", alpha=0.6, label=f"{label} (published)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_shots, [str(k) for k in all_shots])
    return _finish(plt, fig, ax, path, title, "shots per class (K)", "accuracy (%)")


def plot_base_vs_novel(points: dict, path: Path, title: str, published: bool) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    for i, (method, values) in enumerate(points.items()):
        colour = f"C{i % 10}"
        per = [v for k, v in values.items() if k != "average"]
        if per:
            ax.scatter([b for b, _ in per], [n for _, n in per], color=colour, alpha=0.3, s=18, clip_on=False)
        if "average" in values:
            ax.scatter(*values["average"], color=colour, s=80, edgecolor="black", label=method, zorder=3,
                       clip_on=False)
    if published:
        for label, b, n in PUBLISHED_BASE2NOVEL.values():
            ax.scatter(b, n, marker="x", s=60, alpha=0.7, label=f"{label} (published)")
    ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, 102)
    ax.set_ylim(0, 102)
    return _finish(plt, fig, ax, path, title, "base accuracy (%)", "novel accuracy (%)")


def _finish(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Labels, grid and an outside legend; saves the figure to ``path`` and closes it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- writing
def write_report(grid, rows: list[dict], folder: Path, overwrite: bool = False) -> list[Path]:
    """Write summary.md and the plots into ``folder``; returns the files written.

    An existing summary is never replaced unless ``overwrite``: an unchanged summary is left as
    it is, a changed one is written beside it with the date and time in its name (plots too).
    """
    text, series, points = summary_markdown(grid, rows, folder)
    target = folder / "summary.md"
    suffix = ""
    if target.exists() and not overwrite:
        if target.read_text() == text:
            suffix = None  # unchanged: only plots that are missing
        else:
            suffix = "-" + dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    written = []
    if suffix is not None:
        target = folder / f"summary{suffix}.md"
        target.write_text(text)
        written.append(target)
    published = show_published(grid, [d.name for d in grid.datasets])
    fixed = frozenset(m.name for m in grid.methods if not m.fit)
    plots = []
    if series:
        plots.append(("accuracy_vs_shots", partial(plot_accuracy_vs_shots, fixed=fixed), series,
                      f"{grid.name}: accuracy vs shots (mean ± sample std over seeds)"))
    if points:
        plots.append(("base_vs_novel", plot_base_vs_novel, points,
                      f"{grid.name}: base vs novel (large: average; small: per dataset)"))
    if plots and _pyplot() is None:
        print("dpt-bench: plots skipped: matplotlib is not installed (pip install 'dpt_lightning[plots]')")
        return written
    (folder / "plots").mkdir(exist_ok=True)
    for name, plot, data, title in plots:
        path = folder / "plots" / f"{name}{suffix or ''}.png"
        if suffix is None and path.exists():
            continue
        if plot(data, path, title, published):
            written.append(path)
    return written
