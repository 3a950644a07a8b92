"""Quality-vs-time plot and a Markdown table from `bench/decode.py` rows.

    python bench/plot_decode.py bench/results/decode-fashion.json --plot bench/results/decode-quality.png
    python bench/plot_decode.py bench/results/decode-medium-*.json --table

The plot puts every decode setting at its time per image (x) against its
class accuracy and Fréchet distance (y): ReCAP points left of the plain point
at the same T and about as high mean a speed-up at little quality cost; the
matched-cost baseline shows what plain decoding gets for the same time.
"""
import argparse
import json
import os
from typing import List


def load_rows(paths) -> List[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise ValueError(f"{path} does not hold a JSON list of bench rows")
        rows += data
    return rows


def label(row) -> str:
    if row["method"] == "recap":
        return f"T={row['steps']} K={row['recap_cheap_per_full']} P={row['recap_full_only_steps']}"
    return f"T={row['steps']}"


def distinct_settings(rows):
    """One row per decode setting: a matched-cost baseline equal to a plain row (or to an
    earlier matched row) is the same measurement and would draw a second, hiding point."""
    seen, kept = set(), []
    for row in sorted(rows, key=lambda r: r["mode"] == "matched"):
        key = (row["batch"], row["steps"], row["method"], row["recap_cheap_per_full"],
               row["recap_full_only_steps"])
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def plot_quality(rows, path: str):
    """Two panels (class accuracy, Fréchet) against seconds per image, one marker per mode."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r.get("quality")]
    if not rows:
        raise ValueError("no row has a quality entry: run bench/decode.py with --checkpoint and --quality")
    rows = distinct_settings(rows)
    metrics = [("class_accuracy", "class accuracy (higher is better)"),
               ("frechet", "Fréchet distance (lower is better)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(11, 4.2))
    for ax, (key, title) in zip(axes, metrics):
        for mode, marker in (("matched", "s"), ("plain", "o"), ("recap", "^")):  # plain over matched
            subset = [r for r in rows if r["mode"] == mode and key in r["quality"]]
            if not subset:
                continue
            xs = [1.0 / r["images_per_s"] for r in subset]
            ys = [r["quality"][key] for r in subset]
            ax.scatter(xs, ys, marker=marker, s=45, label=mode)
            for x, y, r in zip(xs, ys, subset):
                ax.annotate(label(r), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel("seconds per image (tokens only, batch %d)" % rows[0]["batch"])
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{rows[0]['config']}: decode quality vs time ({rows[0]['device']})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cheap_label(row) -> str:
    """K of a ReCAP row; '(K)' of the ReCAP run a matched-cost baseline stands beside."""
    if row["mode"] == "matched":
        return f"({row.get('matched_recap_cheap_per_full', '?')})"
    return str(row["recap_cheap_per_full"])


def markdown_table(rows) -> str:
    """One line per row: the figures the README's performance section quotes."""
    head = ("| config | batch | T | mode | K | P | full+cheap | images/s | MFU | loop overhead "
            "| speed-up vs plain (bound) | quality |\n|" + "---|" * 12)
    lines = [head]
    for r in rows:
        speed = ""
        if "speedup_vs_plain" in r:
            speed = (f"{r['speedup_vs_plain']:.2f}x ({r['speedup_bound']:.2f}x, "
                     f"{100 * r['bound_fraction']:.0f}%)")
        quality = ""
        if r.get("quality"):
            q = r["quality"]
            quality = (f"acc {q.get('class_accuracy', float('nan')):.3f}, "
                       f"FD {q.get('frechet', float('nan')):.2f}")
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['steps']} | {r['mode']} | {cheap_label(r)} "
            f"| {r['recap_full_only_steps']} | {r['full_evals']}+{r['cheap_evals']} "
            f"| {r['images_per_s']:.2f} | {100 * r['mfu']:.0f}% | {100 * r['loop_overhead']:.1f}% "
            f"| {speed} | {quality} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", nargs="+", help="JSON files written by bench/decode.py")
    p.add_argument("--plot", help="write the quality-vs-time PNG here")
    p.add_argument("--table", action="store_true", help="print a Markdown table")
    args = p.parse_args(argv)
    rows = load_rows(args.rows)
    if args.plot:
        plot_quality(rows, args.plot)
    if args.table or not args.plot:
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
