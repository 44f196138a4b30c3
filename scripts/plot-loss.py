#!/usr/bin/env python3
"""Plots the train and validation losses of a `llama2 train` log as an SVG
(standard library only, so it runs anywhere the trainer does).

    llama2 train ... > train.log 2>&1
    python3 scripts/plot-loss.py train.log docs/training-loss.svg

It reads the evaluation lines the trainer prints (`step N: train loss X,
val loss Y ...`) and draws both curves against the step.
"""

import re
import sys

EVAL = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
WIDTH, HEIGHT, MARGIN = 640, 400, 60


def read(path):
    """(step, train, val) for every evaluation line of the log."""
    points = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = EVAL.search(line)
            if m:
                points.append((int(m[1]), float(m[2]), float(m[3])))
    if len(points) < 2:
        sys.exit(f"{path}: fewer than two evaluation lines ('step N: train loss X, val loss Y')")
    return points


def svg(points, title):
    """The plot as SVG text."""
    steps = [p[0] for p in points]
    losses = [v for p in points for v in p[1:]]
    lo, hi = min(losses), max(losses)
    pad = (hi - lo) * 0.05 or 0.5
    lo, hi = lo - pad, hi + pad

    def x(step):
        return MARGIN + (step - steps[0]) / (steps[-1] - steps[0]) * (WIDTH - 2 * MARGIN)

    def y(loss):
        return HEIGHT - MARGIN - (loss - lo) / (hi - lo) * (HEIGHT - 2 * MARGIN)

    def line(index, color):
        coords = " ".join(f"{x(p[0]):.1f},{y(p[index]):.1f}" for p in points)
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{coords}"/>'

    ticks = []
    for i in range(6):
        loss = lo + (hi - lo) * i / 5
        ticks.append(f'<text x="{MARGIN - 8}" y="{y(loss) + 4:.1f}" text-anchor="end">{loss:.2f}</text>')
        ticks.append(f'<line x1="{MARGIN}" x2="{WIDTH - MARGIN}" y1="{y(loss):.1f}" '
                     f'y2="{y(loss):.1f}" stroke="#eee"/>')
    for i in range(6):
        step = steps[0] + (steps[-1] - steps[0]) * i / 5
        ticks.append(f'<text x="{x(step):.1f}" y="{HEIGHT - MARGIN + 18}" '
                     f'text-anchor="middle">{step:.0f}</text>')
    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        *ticks,
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>',
        line(1, "#1f77b4"),
        line(2, "#d62728"),
        f'<text x="{WIDTH / 2}" y="{MARGIN / 2}" text-anchor="middle" font-size="14">{title}</text>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 15}" text-anchor="middle">step</text>',
        f'<text x="15" y="{HEIGHT / 2}" transform="rotate(-90 15 {HEIGHT / 2})" '
        f'text-anchor="middle">loss (nats per token)</text>',
        f'<text x="{WIDTH - MARGIN - 90}" y="{MARGIN + 10}" fill="#1f77b4">train</text>',
        f'<text x="{WIDTH - MARGIN - 90}" y="{MARGIN + 26}" fill="#d62728">validation</text>',
        "</svg>",
    ])


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: plot-loss.py TRAIN_LOG OUT.svg [TITLE]")
    title = sys.argv[3] if len(sys.argv) == 4 else "llama2 train"
    points = read(sys.argv[1])
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(svg(points, title) + "\n")
    first, last = points[0], points[-1]
    print(f"{len(points)} evaluations: val loss {first[2]:.4f} at step {first[0]} "
          f"-> {last[2]:.4f} at step {last[0]}")


if __name__ == "__main__":
    main()
