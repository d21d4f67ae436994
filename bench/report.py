"""Regenerate the README's benchmark results from the latest JSON under bench/results/.

    python bench/report.py                  # prints the section's text
    python bench/report.py --write-readme   # draws the plots and rewrites README.md between
                                            # the results markers

Reads every result document with the standard header (bench/common.py; older files without
it are ignored), keeps the newest full run per family, device and table (a --quick run only
where no full run exists), draws the plots next to the JSON (PNG, matplotlib), and replaces
the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in README.md with a
section per family: device, date, load average, the table and the plots. bench/run.py uses
the same renderers (``render_doc``, ``plot_doc``) for its own output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import cpu_attention  # noqa: E402
import paper_table2  # noqa: E402
import xl_attention  # noqa: E402

README = common.ROOT / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
NO_GPU = "No GPU has been lent to this project yet, so there are no GPU figures."
TITLES = {
    "sparse_attention": ("Block-sparse attention on GPU", "bench/sparse_attention.py"),
    "cpu_attention": ("Block-sparse attention on CPU", "bench/cpu_attention.py"),
    "xl_attention": ("Transformer-XL attention", "bench/xl_attention.py"),
    "paper_table2": (
        "The Sparse Transformer paper's Table 2 (time per training iteration)",
        "bench/paper_table2.py",
    ),
}
ORDER = list(TITLES)


# --------------------------------------------------------------------------- selection
def load_results(results: Path = common.RESULTS) -> list[dict]:
    """Every standard result document under ``results``, each with its path under "_path"."""
    docs = []
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        # Only the families this report renders (gpu_check.json has the header too).
        if common.is_result(doc) and doc["family"] in TITLES:
            doc["_path"] = path
            docs.append(doc)
    return docs


def _tables(doc: dict) -> set[str]:
    """The tables a document holds (XL has two, which separate runs may produce)."""
    return {r.get("table", doc["family"]) for r in doc["rows"]} or {doc["family"]}


def select_latest(docs: list[dict]) -> list[dict]:
    """Per family, device and table, the newest full run (the newest quick run if none)."""
    best: dict[tuple, dict] = {}
    for doc in docs:
        quick = bool(doc.get("quick") or doc["args"].get("quick"))
        rank = (not quick, doc["date"])
        for table in _tables(doc):
            key = (doc["family"], doc["device"], table)
            if key not in best or rank > best[key][0]:
                best[key] = (rank, doc)
    chosen = {id(d): d for _, d in best.values()}.values()
    return sorted(chosen, key=lambda d: (ORDER.index(d["family"]), d["device"], d["date"]))


# --------------------------------------------------------------------------- tables
def sparse_table(doc: dict) -> str:
    """Markdown table of bench/sparse_attention.py's rows (GPU): effattn (Triton; the CUDA C++
    kernels when built) against SDPA causal, FlexAttention and the masked reference."""
    rows = doc["rows"]

    def find(method, r):
        key = (method, r["pattern"], r["d"], r["n"], r["pass"])
        return next(
            (x for x in rows if (x["method"], x["pattern"], x["d"], x["n"], x["pass"]) == key),
            None,
        )

    out = []
    for r in rows:
        if r["method"] != "effattn":
            continue
        base = next(
            x
            for x in rows
            if x["method"] == "sdpa_causal"
            and (x["d"], x["n"], x["pass"]) == (r["d"], r["n"], r["pass"])
        )
        flex, ref, cuda = find("flex", r), find("reference", r), find("effattn_cuda", r)
        out.append(
            [
                r["d"],
                r["n"],
                f"`{r['pattern']}`",
                f"{r['density_vs_causal']:.3f}",
                r["pass"],
                f"{base['ms']:.3f}",
                f"{r['ms']:.3f}",
                f"{r['tflops']:.1f}",
                f"{base['ms'] / r['ms']:.2f}x",
                f"{cuda['ms']:.3f}" if cuda else "-",
                f"{flex['ms']:.3f}" if flex else "-",
                f"{ref['ms']:.3f}" if ref else "-",
                f"{r['peak_mib']:.0f}",
            ]
        )
    headers = ["D", "n", "pattern", "density", "pass", "SDPA causal ms", "effattn ms"]
    headers += ["TFLOP/s (useful)", "speed-up", "CUDA C++ ms", "FlexAttention ms", "reference ms"]
    headers += ["peak MiB"]
    return common.markdown_table(headers, out)


def render_doc(doc: dict) -> str:
    """The family's Markdown table(s) for one result document."""
    family = doc["family"]
    if family == "sparse_attention":
        return sparse_table(doc)
    if family == "cpu_attention":
        return cpu_attention.table(doc)
    if family == "xl_attention":
        return xl_attention.table(doc)
    if family == "paper_table2":
        return paper_table2.table(doc)
    raise ValueError(f"unknown family {family!r}")


# --------------------------------------------------------------------------- plots
def _time_panels(axes, rows, label, unit, xlabel="sequence length n"):
    """Median time vs n per label(row), one panel per pass, with min-max error bars."""
    from matplotlib.ticker import NullLocator

    ns = sorted({r["n"] for r in rows})
    # One colour per label in both panels (the forward-only FlexAttention would shift them).
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(map(label, rows)))}
    for ax, passname in zip(axes, ("fwd", "fwd+bwd")):
        series: dict[str, list[dict]] = {}
        for r in sorted((r for r in rows if r["pass"] == passname), key=lambda r: r["n"]):
            series.setdefault(label(r), []).append(r)
        for name, sel in series.items():
            ys = [r["median_s"] for r in sel]
            err = [
                [y - r.get("min_s", y) for y, r in zip(ys, sel)],
                [r.get("max_s", y) - y for y, r in zip(ys, sel)],
            ]
            style = "--" if name.startswith("sdpa_causal") else "-"
            xs = [r["n"] for r in sel]
            ax.errorbar(
                xs, ys, yerr=err, fmt=style, color=colors[name], marker="o", ms=3, capsize=2,
                label=name,
            )  # fmt: skip
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=unit, title=passname)
        ax.xaxis.set_minor_locator(NullLocator())  # only the measured n as ticks
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)


def _speedup_panel(ax, points, title, target=True):
    """Speed-up vs density: one line per label through (density, speed-up, note) points,
    each point annotated with its note (the sequence length), beside the 1/density ideal and
    (for the kernel benchmarks) the target of 2 x density x SDPA causal time."""
    import numpy as np

    for label, pts in points:
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=label)
        for x, y, note in pts:
            if note:
                ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
    d = np.geomspace(0.02, 1.0, 50)
    ax.plot(d, 1 / d, "k:", label="1 / density (work-proportional)")
    if target:
        ax.plot(d, 1 / (2 * d), "k--", lw=0.8, label="1 / (2 density) (target)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="density relative to causal")
    ax.set(ylabel="speed-up over SDPA causal", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _label(r: dict) -> str:
    """Legend label of a row: the baseline alone, the other methods with their pattern."""
    name = r["method"] if r["method"] == "sdpa_causal" else f"{r['method']} {r['pattern']}"
    return name + (f" D={r['d']}" if "d" in r else "")


def _pool_baseline(rows: list[dict]) -> list[dict]:
    """cpu_attention measures SDPA causal before and after the other methods: one point per
    n and pass, at the pooled median the ratios use, spanning both measurements."""
    out, seen = [], {}
    for r in rows:
        if r["method"] != "sdpa_causal":
            out.append(r)
            continue
        key = (r["n"], r["pass"])
        if key in seen:
            p = seen[key]
            p["min_s"], p["max_s"] = min(p["min_s"], r["min_s"]), max(p["max_s"], r["max_s"])
            continue
        seen[key] = dict(r, median_s=r["sdpa_causal_median_s"])
        out.append(seen[key])
    return out


def _plot_sparse_like(doc: dict, plt) -> list[tuple]:
    """Time vs n and speed-up vs density, for cpu_attention (s) and sparse_attention (ms)."""
    rows = [r for r in doc["rows"] if "skipped" not in r]
    if doc["family"] == "cpu_attention":
        unit = "seconds (median, min-max)"
        rows = _pool_baseline(rows)
        speed = lambda r: 1 / r["ratio_to_sdpa_causal"]
    else:  # bench/sparse_attention.py: medians in ms, the baseline per head dim
        unit = "milliseconds (median)"
        base = {(r["d"], r["n"], r["pass"]): r["ms"] for r in rows if r["method"] == "sdpa_causal"}
        rows = [dict(r, median_s=r["ms"]) for r in rows]
        speed = lambda r: base[(r["d"], r["n"], r["pass"])] / r["median_s"]
    figs = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    _time_panels(axes, rows, _label, unit)
    figs.append((fig, "time"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, passname in zip(axes, ("fwd", "fwd+bwd")):
        series: dict[str, list[tuple]] = {}
        for r in rows:
            if r["method"] in ("effattn", "effattn_cuda") and r["pass"] == passname:
                point = (r["density_vs_causal"], speed(r), f"n={r['n']}")
                series.setdefault(_label(r), []).append(point)
        _speedup_panel(ax, list(series.items()), passname)
    figs.append((fig, "speedup"))
    return figs


def _plot_xl(doc: dict, plt) -> list[tuple]:
    """Kernel time and memory vs L = M; the evaluation speed-up beside the paper's."""
    from matplotlib.ticker import NullLocator

    figs = []
    kernel = [
        dict(r, n=r["L"], **{"pass": r["mode"]}) for r in doc["rows"] if r["table"] == "kernel"
    ]
    if kernel:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
        _time_panels(axes[:2], kernel, lambda r: r["impl"], "seconds (median, min-max)", "L = M")
        for impl, color in (("original", "C0"), ("effattn", "C1")):
            for mode, style in (("fwd", "--"), ("fwd+bwd", "-")):
                sel = [r for r in kernel if (r["impl"], r["pass"]) == (impl, mode)]
                sel = sorted(
                    (r for r in sel if r["extra_peak_mib"] is not None), key=lambda r: r["n"]
                )
                xs, ys = [r["n"] for r in sel], [r["extra_peak_mib"] for r in sel]
                axes[2].plot(xs, ys, style, color=color, marker="o", ms=3, label=f"{impl} {mode}")
        axes[2].set(xscale="log", yscale="log", ylabel="extra peak MiB", title="memory")
        axes[2].xaxis.set_minor_locator(NullLocator())
        axes[2].set_xticks(axes[0].get_xticks(), [t.get_text() for t in axes[0].get_xticklabels()])
        axes[2].grid(True, which="both", alpha=0.3)
        axes[2].legend(fontsize=7)
        axes[2].set_xlabel("L = M")
        figs.append((fig, "kernel"))
    evals = [r for r in doc["rows"] if r["table"] == "eval"]
    if evals:
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        xs = [r["attn_len"] for r in evals]
        if all("segment_speedup" in r for r in evals):
            ys = [r["segment_speedup"] for r in evals]
            ax.plot(xs, ys, "o-", label="effattn, 128-token segments (this machine)")
        ax.plot(xs, [r["speedup"] for r in evals], "^-", label="effattn, token by token")
        ax.plot(xs, [r["paper_speedup"] for r in evals], "s--", label="paper (Dai et al. 2019)")
        ax.set(yscale="log", xlabel="attention length", ylabel="speed-up over the vanilla model")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        figs.append((fig, "eval"))
    return figs


def _plot_table2(doc: dict, plt) -> list[tuple]:
    """Ratio to dense beside the paper's, and speed-up over dense vs attention density."""
    import numpy as np

    from effattn import patterns

    rows = doc["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    names, x = [r["variant"] for r in rows], np.arange(len(rows))
    ours = [r["ratio_to_dense"] for r in rows]
    paper = [r["paper_ratio_to_dense"] for r in rows]
    axes[0].bar(x - 0.2, ours, 0.4, label=f"effattn, context {doc['context']}")
    axes[0].bar(x + 0.2, paper, 0.4, label="paper, context 12288")
    axes[0].set_xticks(x, names)
    axes[0].set(ylabel="time per iteration / dense", title="ratio to dense")
    axes[0].legend(fontsize=8)
    # The paper's densities: the same patterns at its context.
    causal = patterns.causal().density(12288)
    paper_density = {
        "dense": 1.0,
        "fixed": patterns.fixed(128, 32).density(12288) / causal,
        "strided": patterns.strided(128).density(12288) / causal,
    }
    pts = [
        (
            f"effattn, context {doc['context']}",
            [(r["density_vs_causal"], 1 / v, n) for r, v, n in zip(rows, ours, names)],
        ),
        ("paper, context 12288", [(paper_density[n], 1 / v, n) for n, v in zip(names, paper)]),
    ]
    _speedup_panel(axes[1], pts, "whole training iteration", target=False)
    axes[1].set_ylabel("speed-up over dense")
    return [(fig, "table2")]


PLOTTERS = {
    "sparse_attention": _plot_sparse_like,
    "cpu_attention": _plot_sparse_like,
    "xl_attention": _plot_xl,
    "paper_table2": _plot_table2,
}


def plot_doc(doc: dict, stem: Path) -> list[Path]:
    """Draw the family's plots as ``<stem>_<kind>.png``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on these machines
    import matplotlib.pyplot as plt

    paths = []
    for fig, kind in PLOTTERS[doc["family"]](doc, plt):
        title = f"{TITLES[doc['family']][0]} ({doc['machine']['name']}, {doc['date'][:10]})"
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- section
def _describe(doc: dict, base: Path) -> str:
    m, v = doc["machine"], doc["versions"]
    load = m.get("load_average")
    load_s = "" if not load else f", load average {load[0]:.2f}"
    if m.get("load_average_end"):
        load_s += f" -> {m['load_average_end'][0]:.2f}"
    commit = (v.get("git_commit") or "?")[:8] + ("+dirty" if v.get("git_dirty") else "")
    quick = " (`--quick` run)" if doc.get("quick") or doc["args"].get("quick") else ""
    path = doc["_path"]
    path = path.relative_to(base) if path.is_relative_to(base) else path.name
    return (
        f"{m['name']}{load_s}; {doc['date'][:16].replace('T', ' ')} UTC; torch {v['torch']}, "
        f"triton {v['triton']}, commit {commit}{quick}; `{path}`"
    )


def _setup(doc: dict) -> str:
    """One sentence on what was measured, from the document's own configuration."""
    family, a = doc["family"], doc["args"]
    if family == "cpu_attention":
        c = doc["config"]
        return (
            f'B={c["B"]}, H={c["H"]}, D={c["D"]}, {c["dtype"]}, effattn `backend="cpu"` '
            f"({c['effattn_isa']}); {a['repeats']} timed runs per case (at most 3 over 10 s); "
            "speed-up = SDPA causal time / effattn time, in wall and in process CPU time; "
            "extra MiB = growth of the resident set over the call."
        )
    if family == "xl_attention":
        k, e = doc["setup"]["kernel"], doc["setup"]["eval"]
        return (
            f"Kernel: B={k['B']}, H={k['H']}, D={k['D']}, {k['dtype']}, effattn backend "
            f"`{doc['backend']}` vs the original formulation (materialized AC + BD, rel_shift), "
            f"{a['repeats']} timed runs. Evaluation: a {e['n_layer']}-layer, d_model {e['d_model']} "
            f"XL LM, {e['batch']} streams at once; median ms per token over "
            f"{a.get('segments', '-')} segments of 128 tokens (XL as the paper evaluates it), "
            f"{a['cached_tokens']} tokens decoded one by one (XL) and {a['vanilla_tokens']} "
            "tokens of the vanilla model, which recomputes the whole window for each."
        )
    if family == "paper_table2":
        return (
            f"{a['layers']} pre-norm layers, d_model {a['d_model']}, {a['heads']} heads, batch "
            f"{a['batch']}, context {doc['context']}; forward, backward and Adam step; "
            f"{a['iters']} timed iterations after one warm-up."
        )
    return f"Arguments: `{' '.join(a.get('argv', [])) or '(defaults)'}`."


def render_section(docs: list[dict], plots: dict[int, list[Path]], base: Path) -> str:
    """The Markdown between the markers, for the selected documents and their plots."""
    gpu = [d for d in docs if d["device"] == "cuda"]
    lines = [
        "<!-- generated by `python bench/report.py --write-readme` from bench/results/*.json: edit"
        " the scripts, not this text -->",
        "",
        NO_GPU
        if not gpu
        else "GPU figures: " + ", ".join(sorted({d["machine"]["name"] for d in gpu})) + ".",
        "",
        "One command runs every family on the devices present, prints the tables, and writes the",
        "JSON and plots under `bench/results/`; this section is regenerated from the latest JSON:",
        "",
        "```bash",
        "python bench/run.py              # --device cpu|cuda|all, --families sparse,cpu,xl,table2, --quick",
        "python bench/report.py --write-readme",
        "```",
        "",
        "Times are medians over repeated runs after a warm-up, with their min-max spread; every",
        "ratio compares figures measured in the same run. These 2-core machines are shared, so",
        "each run records its load average; CPU-time ratios are also given where load matters.",
    ]
    for family in ORDER:
        fdocs = [d for d in docs if d["family"] == family]
        if not fdocs:
            continue
        title, script = TITLES[family]
        lines += ["", f"### {title}", "", f"`{script}`."]
        if family == "paper_table2":
            lines += [
                "",
                "Paper (Child et al. 2019, enwik8, context 12,288): dense 1.31, fixed 0.55,",
                "strided 0.35 time per iteration, i.e. ratios to dense 1.00, 0.42, 0.27.",
            ]
        for doc in fdocs:
            lines += ["", f"Device: {_describe(doc, base)}", "", _setup(doc), "", render_doc(doc)]
            if doc.get("targets"):  # cpu_attention: its targets, as measured
                lines += [""] + [f"    {t.strip()}" for t in doc["targets"]["lines"]]
            for path in plots.get(id(doc), []):
                rel = path.relative_to(base).as_posix()
                lines += ["", f"![{path.stem}]({rel})"]
    return "\n".join(lines)


def render(results: Path = common.RESULTS, base: Path = common.ROOT, plot: bool = True) -> str:
    """Select the latest documents under ``results``, draw their plots, return the section."""
    docs = select_latest(load_results(results))
    plots = {id(d): plot_doc(d, d["_path"].with_suffix("")) for d in docs} if plot else {}
    return render_section(docs, plots, base)


def update_readme(section: str, readme: Path = README) -> None:
    """Replace the text between the results markers (which must exist) with ``section``."""
    text = readme.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise SystemExit(f"{readme}: expected one {START} ... {END} pair")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    readme.write_text(f"{head}{START}\n{section}\n{END}{tail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=common.RESULTS, help="JSON directory")
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument(
        "--write-readme", action="store_true", help="rewrite the README's results section"
    )
    args = ap.parse_args(argv)
    section = render(args.results, args.readme.parent, plot=args.write_readme)
    if args.write_readme:
        update_readme(section, args.readme)
        print(f"updated {args.readme}")
    else:
        print(section)
        print(f"\n(printed only: --write-readme puts this into {args.readme})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
