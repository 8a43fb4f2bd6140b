"""README's jammer tables (R-MTLLMF section) as the plot beside them, so figure and table never disagree.

    python benchmarks/plot_jammed_tables.py [--readme README.md] [--out docs/rmtllmf_jammed_8tasks.png]

The tables' rows come from several runs of benchmarks/rmtllmf_benchmark.py (each command is printed
next to its rows in README); a run's own jammed.png shows only that run's rows. Bold marks and "—"
(not run) are read as values and gaps; the relative-MSE row is left out.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLES = ("worst-case jammer (dB)", "strongest-user jammer (dB)")


def markdown_table(text: str, first_header: str) -> tuple[list[float], dict[str, list[float | None]]]:
    """The table whose header row starts with ``first_header``: its powers and, per row, the values
    (None where the cell is "—")."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |")), None)
    if start is None:
        raise ValueError(f"no table headed {first_header!r}")
    powers = [float(c) for c in _cells(lines[start])[1:]]
    rows: dict[str, list[float | None]] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        name, *cells = _cells(line)
        if len(cells) != len(powers):
            raise ValueError(f"row {name!r} has {len(cells)} values for {len(powers)} powers")
        if name.startswith("relative MSE"):
            continue
        rows[name] = [None if c in ("—", "-", "") else float(c.strip("*")) for c in cells]
    return powers, rows


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def zero_shot(text: str) -> float | None:
    """The zero-shot model's normalised accuracy from the ideal-channel table (what a server that
    ignores the uplink keeps), or None."""
    found = re.search(r"^\| zero-shot \| [\d.]+ \| ([\d.]+) \|", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def plot(tables: dict[str, tuple[list[float], dict[str, list[float | None]]]], out: Path,
         reference: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 6.5), squeeze=False)
    colours, styles = plt.get_cmap("tab20").colors, ("-", "--", ":")
    for ax, (title, (powers, rows)) in zip(axes[0], tables.items()):
        for i, (name, values) in enumerate(rows.items()):
            points = [(p, v) for p, v in zip(powers, values) if v is not None]
            label = re.sub(r"\s*\((?!lr)[^)]*\)", "", name)  # the parameters are in the table
            ax.plot(*zip(*points), marker="o", color=colours[(2 * i) % 20 + (2 * i) // 20],
                    linestyle=styles[i % len(styles)], label=label)
        if reference is not None:
            ax.axhline(reference, color="black", linewidth=0.8, linestyle="-.", label="zero-shot (uplink ignored)")
        ax.set_title(f"{title.removesuffix(' (dB)')}, ZF receiver, 8 tasks")
        ax.set_xlabel("jammer power (dB)")
        ax.set_ylabel("normalised accuracy")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=REPO / "README.md")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "rmtllmf_jammed_8tasks.png")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    plot({title: markdown_table(text, title) for title in TABLES}, args.out, zero_shot(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
