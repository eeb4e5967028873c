"""Draw the label saving of every setting tried for issue 5's bar, read from the stored reports.

    PYTHONPATH=. python docs/simulate/saving_chart.py [OUT.png]

Each row is one rule on one setting: the reviewed images it needs to reach random's mean of
the three metrics at random's full budget (80), as a share of 80, read from the
``label_saving`` of the ``results.json`` (or ``oracle3.json`` ...) that the row names, which
``annotator simulate`` (or ``units3x.py``) wrote. Where the report also holds the reading at
equal training (``--settle``: every earlier point trained the rounds it lacks), a second, hatched
bar shows it. A rule that never reaches random's 80 is drawn past 100 % and marked. The bar of
issue 5 is the dashed line at 50 %, read on the default settings, as trained. Prints the same
figures as a table. Default OUT: ``docs/simulate/label_saving.png``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

D, O = "default settings (the bar's)", "other settings"
# setting | rule | report under docs/simulate/ | strategy | trainings per deciding unit
TABLE = """
D | judge (the verdict) | auto-labels-repeats3-named/results.json | judge | 3
D | judge + 10 % random audit | auto-labels-repeats3-named/results.json | judge_audit | 3
D | uncertainty | auto-labels-repeats3-named/results.json | uncertainty | 3
D | random first, then judge | auto-labels-repeats3/results.json | random_then_judge | 3
D | the daemon's review share | streamed-default/repeats3/results.json | judge_stream | 3
D | typical and diverse picks (typiclust) | auto-labels-typiclust/repeats3/results.json | typiclust | 3
D | error oracle (reads the ground truth) | headroom/oracle3.json | oracle_error | 3
O | judge, 6 epochs a round | epochs6-auto/deciding3x.json | judge | 3
O | judge, 416 px and 6 epochs | px416e6/results.json | judge | 2
O | judge, rounds of 20 | rounds20-full/results.json | judge | 1
O | judge, confident auto labels only | auto-labels-trusted25/repeats3/results.json | judge | 3
O | judge, the roof camera shift | roof-auto/results.json | judge | 1
O | judge, reviewed labels carried along the recording | propagate/settled/results.json | judge | 1
O | ... + one review per recording, the daemon's share | propagate/streamed35/repeats3/results.json | judge_stream_session | 3
O | ... + one review per recording, the daemon's share | propagate/streamed35/settled/results.json | judge_stream_session | 1
"""
ROWS = [({"D": D, "O": O}[g], label, report, strategy, int(n))
        for g, label, report, strategy, n in (map(str.strip, line.split("|")) for line in TABLE.strip().splitlines())]


def fraction(saving: dict, strategy: str) -> float | None:
    """The share of random's budget the strategy needs for the mean of the three (None: not reached)."""
    return saving["strategies"][strategy]["mean3"]["fraction"]


def read_rows(rows=ROWS, root: Path = HERE) -> list[dict]:
    out = []
    for group, label, report, strategy, trainings in rows:
        data = json.loads((root / report).read_text())
        settled = (data.get("settled") or {}).get("label_saving")
        out.append({"group": group, "label": label, "report": report, "strategy": strategy, "trainings": trainings,
                    "as_trained": fraction(data["label_saving"], strategy),
                    "equal_training": fraction(settled, strategy) if settled else None,
                    "has_equal": settled is not None})
    return out


def draw(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bar(y: float, value: float | None, height: float, suffix: str = "", **style) -> None:
        """One bar with its figure; a rule that never reaches random's 80 runs past 100 %."""
        length = 1.08 if value is None else value
        ax.barh(y, length, height=height, **style)
        ax.text(length + 0.01, y, ("not reached" if value is None else f"{value:.0%}") + suffix, va="center", fontsize=8)

    fig, ax = plt.subplots(figsize=(10.5, 0.42 * len(rows) + 1.6))
    ys = list(range(len(rows)))[::-1]
    for y, r in zip(ys, rows):
        colour = "tab:blue" if r["group"].startswith("default") else "tab:gray"
        if r["has_equal"]:
            bar(y + 0.18, r["as_trained"], 0.36, color=colour, alpha=0.9)
            bar(y - 0.18, r["equal_training"], 0.36, " at equal training", color="white", edgecolor=colour, hatch="///")
        else:
            bar(y, r["as_trained"], 0.6, color=colour, alpha=0.9)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['label']} ({r['trainings']}x)" for r in rows], fontsize=8)
    ax.axvline(0.5, color="tab:red", linestyle="--", linewidth=1.2)
    ax.text(0.5, len(rows) - 0.35, " the bar: 50 %", color="tab:red", fontsize=8, va="bottom")
    ax.axvline(1.0, color="black", linewidth=0.8)
    split = sum(1 for r in rows if r["group"].startswith("default"))
    ax.axhline(len(rows) - split - 0.5, color="black", linewidth=0.6)
    ax.set_xlim(0, 1.35)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_xticklabels(["0", "25 %", "50 %", "75 %", "100 %"])
    ax.set_xlabel("reviewed images needed to reach random's accuracy at 80 reviews\n"
                  "(mean of the three metrics, 3 seeds; as a share of 80)", fontsize=8)
    ax.set_title("Label saving by setting: blue = the bar's default settings, gray = other settings;\n"
                 "(Nx) = trainings per deciding unit; hatched = at equal training (--settle)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    def pct(v: float | None) -> str:
        return "not reached" if v is None else f"{v:.0%}"

    lines = ["| setting and rule | trainings | as trained (the bar's reading) | at equal training | report |",
             "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['group']}: {r['label']} | {r['trainings']} | {pct(r['as_trained'])} | "
                     f"{pct(r['equal_training']) if r['has_equal'] else ''} | {r['report']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else HERE / "label_saving.png"
    rows = read_rows()
    draw(rows, out)
    print(table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
