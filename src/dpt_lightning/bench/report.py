"""A grid's results as ``summary.md`` and plots (statistics with pandas).

Conventions (also stated at the top of every summary):

* accuracy is the overall (micro) top-1 accuracy in percent;
* ``±`` is the SAMPLE standard deviation over seeds (``ddof=1``); a value from one seed has none;
* a dataset's value is the mean over its seeds; the *average* over datasets is the mean of those
  per-dataset means, and its ``±`` is the sample std over seeds of the per-seed averages (seeds
  that every dataset has);
* a method that learns nothing (zero-shot) has one value per dataset, shown at every shot count;
* a grid with several ``backbones:`` shows every method once per backbone (``coop @ clip``) and a
  methods × backbones table;
* base-to-novel: per dataset, HM = 2·B·N / (B + N) of the dataset's mean base accuracy B and mean
  novel accuracy N (the true harmonic mean). Averaged over datasets it is given two ways:
  "HM of averages" (HM of the average B and average N, the convention of CoCoOp-style tables) and
  "mean of HMs" (the mean of the per-dataset HMs). "(B+N)/2" is the plain arithmetic mean, shown
  only because one reference reports it under the name HM; it is not a harmonic mean. Every
  average is given with and without BUSI, whose novel set is one class (100% by construction).

The papers' published averages come from ``published.csv``, shipped in this package (one row per
method, protocol, shot count and metric, with its reference).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
from functools import lru_cache, partial
from importlib import resources
from pathlib import Path

import pandas as pd

from dpt_lightning.bench.folder import STAMP, STAMP_PATTERN
from dpt_lightning.files import atomic_write

EXCLUDED_FOR_NOVEL = "BUSI"
PUBLISHED_FILE = "published.csv"
METRIC_COLUMNS = ("acc", "macro_acc", "f1", "auroc", "novel_acc", "novel_macro_acc", "novel_f1", "novel_auroc",
                  "train_seconds", "eval_seconds", "total_seconds", "peak_rss_mb", "cuda_max_allocated_mb",
                  "trainable_params", "checkpoint_bytes")
PERCENT_COLUMNS = ("acc", "novel_acc", "macro_acc", "novel_macro_acc", "f1", "novel_f1")
NAN = math.nan
#: Marks a summary collected while cells still ran (hidden in the rendered Markdown): the next
#: collect replaces it instead of writing a dated summary beside it.
PROVISIONAL = "<!-- dpt-bench: provisional summary -->"


# ------------------------------------------------------------------------ published
@lru_cache(maxsize=1)
def published() -> pd.DataFrame:
    """The papers' published numbers (``dpt_lightning/bench/published.csv``; lines starting with
    ``#`` are its notes on where each block comes from): columns method, label (one summary row
    per label), protocol, dataset ('average' or a dataset), datasets, seeds, shots (empty: every
    K), metric, value (%), approximate, reference."""
    with resources.files("dpt_lightning.bench").joinpath(PUBLISHED_FILE).open("r", encoding="utf-8") as f:
        table = pd.read_csv(f, comment="#", keep_default_na=False, na_values={"shots": [""], "seeds": [""]})
    table["value"] = table["value"].astype(float)
    return table


def published_fewshot(shots: list[int]) -> list[tuple[str, dict[int, float]]]:
    """``(label, {K: average accuracy})`` per published method (a row without shots holds for every K)."""
    table = published()
    table = table[(table["protocol"] == "fewshot") & (table["dataset"] == "average") & (table["metric"] == "acc")]
    out = []
    for label, rows in table.groupby("label", sort=False):
        by_k = {int(k): v for k, v in zip(rows["shots"], rows["value"]) if not pd.isna(k)}
        every = rows.loc[rows["shots"].isna(), "value"]
        if not every.empty:
            by_k = {k: float(every.iloc[0]) for k in shots} | by_k
        out.append((label, by_k))
    return out


def published_base2novel() -> list[tuple[str, float, float, int]]:
    """``(label, base %, novel %, number of datasets)`` per published method."""
    table = published()
    table = table[(table["protocol"] == "base2novel") & (table["dataset"] == "average")]
    wide = table.pivot_table(index="label", columns="metric", values="value", sort=False)
    datasets = table.groupby("label", sort=False)["datasets"].first()
    return [(label, float(row["base_acc"]), float(row["novel_acc"]), int(datasets[label]))
            for label, row in wide.iterrows()]


def published_references(protocols: list[str]) -> list[str]:
    table = published()
    return list(dict.fromkeys(table.loc[table["protocol"].isin(protocols), "reference"]))


# ----------------------------------------------------------------------- statistics
def mean_std(values) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for fewer than 2 values) and count."""
    series = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna().astype(float)
    if series.empty:
        return NAN, NAN, 0
    return float(series.mean()), float(series.std(ddof=1)), int(series.count())


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
        table[column] = pd.to_numeric(table[column], errors="coerce") if column in table else NAN
    for column in PERCENT_COLUMNS:
        table[column] = table[column] * 100
    return table


def with_shots(table: pd.DataFrame, shots: list[int]) -> pd.DataFrame:
    """Rows of test-only methods (no shots) repeated at every shot count of the grid."""
    fixed = table[table["shots"].isna()]
    repeated = [fixed.assign(shots=float(k)) for k in shots]
    return pd.concat([table[table["shots"].notna()], *repeated], ignore_index=True)


def per_dataset(table: pd.DataFrame, column: str, keys: list[str]) -> dict[tuple, tuple[float, float, int]]:
    """``keys + [dataset]`` -> (mean, sample std, n) of ``column`` over seeds."""
    stats = table.groupby([*keys, "dataset"], dropna=False, sort=False)[column].agg(["mean", "std", "count"])
    return {key: (float(row["mean"]), float(row["std"]), int(row["count"])) for key, row in stats.iterrows()}


def average_over_datasets(table: pd.DataFrame, column: str, datasets: list[str]) -> tuple[float, float, int]:
    """Mean of the per-dataset means of ``column`` (datasets present), the sample std over seeds
    of the per-seed averages (seeds present in every dataset) and the number of datasets."""
    table = table[table["dataset"].isin(datasets)].dropna(subset=[column])
    if table.empty:
        return NAN, NAN, 0
    means = table.groupby("dataset")[column].mean()
    by_seed = (table.assign(seed_key=table["seed"].fillna(-1))
               .pivot_table(index="seed_key", columns="dataset", values=column, aggfunc="mean"))
    per_seed = by_seed.dropna().mean(axis=1)  # seeds that every dataset has
    return float(means.mean()), float(per_seed.std(ddof=1)) if len(per_seed) > 1 else NAN, int(means.count())


def base2novel_average(table: pd.DataFrame, datasets: list[str]) -> dict[str, float]:
    """Average base and novel accuracy of one method over ``datasets`` and the three "HM"s."""
    means = (table[table["dataset"].isin(datasets)].groupby("dataset", sort=False)[["acc", "novel_acc"]]
             .mean().dropna())
    if means.empty:
        return {}
    hms = pd.Series([harmonic_mean(b, n) for b, n in zip(means["acc"], means["novel_acc"])], dtype=float)
    base, novel = float(means["acc"].mean()), float(means["novel_acc"].mean())
    return {"base": base, "novel": novel, "hm_of_averages": harmonic_mean(base, novel),
            "mean_of_hms": float(hms.mean()), "arithmetic": float(means[["acc", "novel_acc"]].stack().mean()),
            "datasets": len(means)}


# --------------------------------------------------------------------------- format
def cell(mean: float, std: float = NAN, n: int | None = None, expected: int | None = None) -> str:
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


def _expected_seeds(grid, method: str) -> int:
    return len(grid.seeds) if next(m for m in grid.methods if m.name == method).fit else 1


# ------------------------------------------------------------------------ backbones axis
def backbone_labels(grid) -> list[str]:
    """The labels of the grid's backbones when it compares several (else none: one row per method)."""
    backbones = getattr(grid, "backbones", None) or []
    return [b.name for b in backbones] if len(backbones) > 1 else []


def per_backbone(grid, table: pd.DataFrame):
    """The grid and table with one "method" per method and backbone (``coop @ clip``), so that
    every section shows each method on each backbone; unchanged for a grid with one backbone."""
    labels = backbone_labels(grid)
    if not labels:
        return grid, table
    methods = [dataclasses.replace(m, name=f"{m.name} @ {label}") for m in grid.methods for label in labels]
    table = table.copy()
    if len(table):
        table["method"] = table["method"].astype(str) + " @ " + table["backbone_label"].astype(str)
    return dataclasses.replace(grid, methods=methods), table


def backbones_section(grid, series: dict, points: dict) -> str:
    """Methods (rows) × backbones (columns): few-shot accuracy averaged over datasets and K, and
    base-to-novel HM of the average base and novel accuracies."""
    labels = backbone_labels(grid)
    parts = ["## Methods × backbones"]
    if series:
        rows = []
        for method in grid.methods:
            row = [method.name]
            for label in labels:
                means = [mean for mean, _ in series.get(f"{method.name} @ {label}", {}).values()]
                row.append(cell(float(pd.Series(means, dtype=float).mean())) if means and not any(
                    math.isnan(m) for m in means) else "–")
            rows.append(row)
        parts += ["\nFew-shot: accuracy (%) averaged over the datasets and over K\n",
                  markdown_table(["method", *labels], rows)]
    if any(points.values()):
        rows = []
        for method in grid.methods:
            row = [method.name]
            for label in labels:
                base, novel = points.get(f"{method.name} @ {label}", {}).get("average", (NAN, NAN))
                row.append("–" if math.isnan(base) or math.isnan(novel) else cell(harmonic_mean(base, novel)))
            rows.append(row)
        parts += ["\nBase-to-novel: HM of the average base and novel accuracies (%)\n",
                  markdown_table(["method", *labels], rows)]
    return "\n".join(parts)


# ------------------------------------------------------------------------- sections
def fewshot_section(grid, table: pd.DataFrame, published_rows: bool) -> tuple[str, dict]:
    """Markdown of the few-shot tables and the plotted series {method: {K: (mean, std)}}."""
    shots = grid.shots["fewshot"]
    table = with_shots(table[table["protocol"] == "fewshot"], shots)
    methods = [m.name for m in grid.methods]
    datasets = [d.name for d in grid.datasets]
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
        means = pd.Series([v[0] for v in values.values()], dtype=float).dropna()
        row.append(cell(float(means.mean())) if len(means) == len(shots) else "–")
        rows.append(row)
    if published_rows:
        for label, by_k in published_fewshot(shots):
            complete = all(k in by_k for k in shots)
            rows.append([f"*published:* {label}"] + [cell(by_k.get(k, NAN)) for k in shots]
                        + [cell(float(pd.Series([by_k[k] for k in shots]).mean())) if complete else "–"])
    parts = [f"## Few-shot: accuracy (%) averaged over {len(datasets)} dataset(s)\n",
             markdown_table(["method", *[f"K={k}" for k in shots], "mean over K"], rows)]
    if published_rows:
        parts.append("\n" + published_note(["fewshot"]))
    for k in shots:
        cells = per_dataset(table[table["shots"] == k], "acc", ["method"])
        rows = []
        for method in methods:
            expected = _expected_seeds(grid, method)
            row = [method] + [cell(*cells.get((method, d), (NAN, NAN, 0)), expected) for d in datasets]
            mean, std, n = average_over_datasets(table[(table["method"] == method) & (table["shots"] == k)],
                                                 "acc", datasets)
            rows.append(row + [cell(mean, std, n, len(datasets))])
        parts += [f"\n### K = {k} shots: accuracy (%) per dataset, mean ± std over seeds\n",
                  markdown_table(["method", *datasets, "average"], rows)]
    return "\n".join(parts), series


def published_note(protocols: list[str]) -> str:
    references = "; ".join(published_references(protocols))
    return ("*published* rows: the papers' averages over the benchmark datasets and 3 seeds, as listed in "
            f"`dpt_lightning/bench/published.csv` (shipped with the package; references: {references}); "
            "comparable only with the same datasets, seeds and backbone.")


def base2novel_section(grid, table: pd.DataFrame, published_rows: bool) -> tuple[str, dict]:
    """Markdown of the base-to-novel tables and the plotted points {method: {dataset|"average": (B, N)}}."""
    table = table[table["protocol"] == "base2novel"]
    methods = [m.name for m in grid.methods]
    datasets = [d.name for d in grid.datasets]
    without = [d for d in datasets if d.upper() != EXCLUDED_FOR_NOVEL]
    parts = []
    points: dict[str, dict[str, tuple[float, float]]] = {}
    for title, column in (("base classes", "acc"), ("novel classes", "novel_acc")):
        cells = per_dataset(table, column, ["method"])
        rows = []
        for method in methods:
            row = [method] + [cell(*cells.get((method, d), (NAN, NAN, 0)), _expected_seeds(grid, method))
                              for d in datasets]
            summary = base2novel_average(table[table["method"] == method], datasets)
            rows.append(row + [cell(summary.get("base" if column == "acc" else "novel", NAN))])
        parts += [f"\n### Base-to-novel: accuracy (%) on the {title}, mean ± std over seeds\n",
                  markdown_table(["method", *datasets, "average"], rows)]
    rows = []
    for method in methods:
        mine = table[table["method"] == method]
        means = mine.groupby("dataset")[["acc", "novel_acc"]].mean()
        hms, points[method] = [], {}
        for d in datasets:
            b, n = (float(means.at[d, "acc"]), float(means.at[d, "novel_acc"])) if d in means.index else (NAN, NAN)
            if math.isnan(b) or math.isnan(n):
                hms.append("–")
                continue
            hms.append(cell(harmonic_mean(b, n)))
            points[method][d] = (b, n)
        average = base2novel_average(mine, datasets)
        if average:
            points[method]["average"] = (average["base"], average["novel"])
        rows.append([method, *hms, cell(average.get("mean_of_hms", NAN))])
    parts += ["\n### Base-to-novel: harmonic mean HM = 2BN/(B+N) per dataset (of the seed means)\n",
              markdown_table(["method", *datasets, "mean of HMs"], rows)]
    for label, names in (("all datasets", datasets), ("without BUSI", without)):
        if label == "without BUSI" and len(names) == len(datasets):
            continue
        rows = []
        for method in methods:
            s = base2novel_average(table[table["method"] == method], names)
            rows.append([method, cell(s.get("base", NAN)), cell(s.get("novel", NAN)),
                         cell(s.get("hm_of_averages", NAN)), cell(s.get("mean_of_hms", NAN)),
                         cell(s.get("arithmetic", NAN)), str(s.get("datasets", 0))])
        if published_rows:
            for label_p, b, n, count in published_base2novel():
                rows.append([f"*published:* {label_p}", cell(b), cell(n), cell(harmonic_mean(b, n)), "–",
                             cell(float(pd.Series([b, n]).mean())), str(count)])
        parts += [f"\n### Base-to-novel averages ({label})\n",
                  markdown_table(["method", "base", "novel", "HM of averages", "mean of HMs", "(B+N)/2 (not an HM)",
                                  "datasets"], rows)]
    if published_rows:
        parts.append("\n" + published_note(["base2novel"]) + " Their HM is computed here from the published "
                     "averages. The references differ on BUSI (one includes it).")
    return "## Base-to-novel\n" + "\n".join(parts), points


def cost_section(grid, table: pd.DataFrame) -> str:
    """Per method: trainable parameters, checkpoint size, mean seconds, peak memory."""
    rows = []
    for method in [m.name for m in grid.methods]:
        mine = table[table["method"] == method]
        if mine.empty:
            continue

        def stat(column, how="mean", scale=1.0, digits=1):
            values = mine[column].dropna() if column in mine else pd.Series(dtype=float)
            return "–" if values.empty else f"{getattr(values, how)() * scale:,.{digits}f}"

        rows.append([method, stat("trainable_params", "max", digits=0), stat("checkpoint_bytes", "max", 1 / 1024),
                     stat("train_seconds"), stat("eval_seconds"), stat("peak_rss_mb", "max", digits=0),
                     stat("cuda_max_allocated_mb", "max", digits=0)])
    return ("## Cost per run\n\n" + markdown_table(
        ["method", "trainable params", "checkpoint KiB", "train s (mean)", "eval s (mean)", "peak RSS MiB (max)",
         "CUDA max allocated MiB"], rows))


def unreadable_section(unreadable: list[str], folder: Path) -> str:
    if not unreadable:
        return ""
    lines = [f"- `{problem}`" for problem in unreadable]
    return (f"## Unreadable result files ({len(unreadable)})\n\nLeft out of the tables above; their cells count "
            f"as not run: run them again with `dpt-bench --resume {folder}`.\n\n" + "\n".join(lines))


def failures_section(rows: list[dict]) -> str:
    failed = [r for r in rows if r.get("status") != "ok"]
    if not failed:
        return ""
    lines = [f"- `{r['run_id']}`: {str(r.get('error', ''))[:300]}" for r in failed]
    return (f"## Failed runs ({len(failed)})\n\nLeft out of the tables above; rerun the grid (or `--resume`) to "
            "retry them (details: `runs/<run id>/error.txt`).\n\n" + "\n".join(lines))


def summary_markdown(grid, rows: list[dict], folder: Path, pending: int = 0,
                     unreadable: list[str] = ()) -> tuple[str, dict, dict]:
    """The whole summary.md text, the few-shot series and the base-to-novel points; ``pending``
    cells still running or to do make it provisional (`PROVISIONAL`)."""
    original = grid
    grid, table = per_backbone(grid, frame(rows))
    datasets = [d.name for d in grid.datasets]
    published_rows = show_published(grid, datasets)
    ok = sum(r.get("status") == "ok" for r in rows)
    backbones = sorted(set(table["backbone"].dropna().astype(str))) if "backbone" in table else []
    header = [
        f"# Benchmark `{grid.name}`",
        "",
        f"Run folder `{Path(folder).name}`; {ok} finished run(s) of this grid in `results.csv` "
        f"(methods: {', '.join(m.name for m in grid.methods)}; datasets: {', '.join(datasets)}; "
        f"seeds: {', '.join(map(str, grid.seeds))}; backbone: {', '.join(backbones) or '–'}).",
        "",
        "Accuracy is the overall (micro) top-1 accuracy in %, of the last epoch's model. `±` is the **sample** "
        "standard deviation over seeds (ddof = 1); a value from one seed has none. `(n/m)`: only n of the m "
        "expected seeds or datasets finished. Averages are means of the per-dataset means; a test-only method "
        "(zero-shot) has one value per dataset, shown at every K.",
    ]
    if pending:
        header += ["", f"**Provisional:** {pending} cell(s) of the grid are still running or to do; the next "
                       f"collect replaces this file. {PROVISIONAL}"]
    if not published_rows:
        header.append("\nThe papers' published averages are not shown: this grid's datasets are not the benchmark's.")
    parts, series, points = ["\n".join(header)], {}, {}
    if "fewshot" in grid.protocols:
        text, series = fewshot_section(grid, table, published_rows)
        parts.append(text)
    if "base2novel" in grid.protocols:
        text, points = base2novel_section(grid, table, published_rows)
        parts.append(text)
    if backbone_labels(original):
        parts.append(backbones_section(original, series, points))
    parts.append(cost_section(grid, table))
    sections = (failures_section(rows), unreadable_section(list(unreadable), folder))
    parts += [section for section in sections if section]
    return "\n\n".join(parts) + "\n", series, points


# ---------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_shots(series: dict, path: Path, title: str, published_rows: bool,
                           fixed: frozenset = frozenset()) -> Path:
    """Average accuracy against K per method (error bars: sample std over seeds); methods in
    ``fixed`` (test only) are dashed lines; published averages dotted."""
    plt = _pyplot()
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
    if published_rows:
        for label, by_k in published_fewshot(all_shots):
            ks = [k for k in all_shots if k in by_k]
            if ks:
                ax.plot(ks, [by_k[k] for k in ks], linestyle=":", marker="x", alpha=0.6, label=f"{label} (published)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_shots, [str(k) for k in all_shots])
    return _finish(plt, fig, ax, path, title, "shots per class (K)", "accuracy (%)")


def plot_base_vs_novel(points: dict, path: Path, title: str, published_rows: bool) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    for i, (method, values) in enumerate(points.items()):
        colour = f"C{i % 10}"
        per = [v for k, v in values.items() if k != "average"]
        if per:
            ax.scatter([b for b, _ in per], [n for _, n in per], color=colour, alpha=0.3, s=18, clip_on=False)
        if "average" in values:
            ax.scatter(*values["average"], color=colour, s=80, edgecolor="black", label=method, zorder=3,
                       clip_on=False)
    if published_rows:
        for label, b, n, _ in published_base2novel():
            ax.scatter(b, n, marker="x", s=60, alpha=0.7, label=f"{label} (published)")
    ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlim(0, 102)
    ax.set_ylim(0, 102)
    return _finish(plt, fig, ax, path, title, "base accuracy (%)", "novel accuracy (%)")


def _finish(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """Labels, grid and an outside legend; saves the figure to ``path`` atomically and closes it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- writing
def summaries(folder: Path) -> list[Path]:
    """The summaries of a run folder, oldest first: ``summary.md``, then the dated ones."""
    dated = sorted(p for p in Path(folder).glob("summary-*.md")
                   if re.fullmatch(f"summary-{STAMP_PATTERN}.md", p.name))
    return [p for p in [Path(folder) / "summary.md", *dated] if p.is_file()]


def write_report(grid, rows: list[dict], folder: Path, overwrite: bool = False, pending: int = 0,
                 unreadable: list[str] = ()) -> list[Path]:
    """Write summary.md and the plots into ``folder``; returns the files written.

    Compared with the newest summary: unchanged, nothing is written (only missing plots); a
    provisional one (collected while cells ran) is replaced; a finished one is never replaced
    unless ``overwrite``: the new text goes beside it with the date and time in its name (plots too).
    """
    folder = Path(folder)
    text, series, points = summary_markdown(grid, rows, folder, pending, unreadable)
    latest = ([] if overwrite else summaries(folder))[-1:]
    target = latest[0] if latest else folder / "summary.md"
    written = []
    if latest and target.read_text() == text:
        changed = False  # unchanged: only plots that are missing
    else:
        changed = True
        if latest and PROVISIONAL not in target.read_text():
            target = folder / f"summary-{dt.datetime.now().strftime(STAMP)}.md"
        atomic_write(target, text)
        written.append(target)
    suffix = target.stem[len("summary"):]
    published_rows = show_published(grid, [d.name for d in grid.datasets])
    fixed = frozenset(m.name for m in per_backbone(grid, pd.DataFrame())[0].methods if not m.fit)
    plots = []
    if any(not math.isnan(mean) for values in series.values() for mean, _ in values.values()):
        plots.append(("accuracy_vs_shots", partial(plot_accuracy_vs_shots, fixed=fixed), series,
                      f"{grid.name}: accuracy vs shots (mean ± sample std over seeds)"))
    if any(points.values()):
        plots.append(("base_vs_novel", plot_base_vs_novel, points,
                      f"{grid.name}: base vs novel (large: average; small: per dataset)"))
    for name, plot, data, title in plots:
        path = folder / "plots" / f"{name}{suffix}.png"
        if not changed and path.exists():
            continue
        written.append(plot(data, path, title, published_rows))
    return written
