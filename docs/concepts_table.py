"""The README's table of several concepts on the toy: one eraser trained on two (then three) colours at once,
against each colour's own eraser and against the single erasers stacked, at training seeds 0-2.

    python docs/concepts_table.py                                  # red+blue, red+blue+green: 50 min on 2 cores
    python docs/concepts_table.py --colours green yellow --seeds 0
    python docs/concepts_table.py --steps 1000                     # the joint erasers trained longer

For each seed it trains, with the README's command `python unlearn.py --model toy --concept C --seed S`,
one eraser per colour and one with every colour (`--concept red --concept blue`, then the first three),
then judges them on the toy's test set as `sample.py --eval toy --steps 20 --seed 11` does
(`toy.erasure_report`; a test checks the two agree): each single eraser on its own colour's test set, the
joint and the stacked ones on the test set of every colour they erase (`erasure_cases('red, blue')`). It
prints one markdown table per set of colours, every cell k/n videos pooled over the seeds with its 95 %
interval, and the run's cost: the x_t pool's and the steps' seconds, single against joint. Into --out
(default outputs/concepts_table, which must not exist yet).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy  # noqa: E402
from sample import load_pipeline  # noqa: E402
from videos import Rate  # noqa: E402

HERE = sys.path[0]


def train(out, concepts, seed, extra=()):
    """`unlearn.py` on the toy; returns the seconds its x_t pool and its steps took, as its bars said."""
    cmd = ["unlearn.py", "--model", "toy", *[a for c in concepts for a in ("--concept", c)], "--seed", str(seed),
           "--output-dir", out, *extra]
    print("$ python " + " ".join(cmd), flush=True)
    done = subprocess.run([sys.executable, *cmd], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if done.returncode:
        sys.exit(f"error: that command failed:\n{done.stderr[-2000:]}")
    seconds = {}
    for bar in ("x_t pool", "unlearning"):  # a tqdm bar's last state: 'desc: 100%|...| n/n [mm:ss<00:00, ...'
        mm, ss = re.findall(rf"{bar}: 100%.*?\[(\d+):(\d+)<", done.stderr)[-1]
        seconds[bar] = 60 * int(mm) + int(ss)
    return seconds


def judge(erasers, concept):
    """The toy's test set for `concept` (colours), drawn by the toy with `erasers` (none: the original)."""
    return toy.erasure_report(load_pipeline("toy", eraser=erasers or None), concept, seed=11, steps=20)


def pooled(rates):
    return Rate(sum(r.k for r in rates), sum(r.n for r in rates))


def print_table(colours, results, seeds):
    """Rows of the joint test set; columns: the original, each colour's own eraser, joint, stacked."""
    concept = ", ".join(colours)
    rows = list(results["original"])
    print(f"\n| videos ({' + '.join(colours)}) | original | own single eraser | one joint eraser | "
          "single erasers stacked | joint, worst seed |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        own = [c for c in colours if row.endswith(f"({c})")]
        single_row = re.sub(r" \(\w+\)$", "", row)  # the single eraser's table names it without its colour
        singles = [results[f"single {c} {s}"][single_row] for s in seeds for c in (own or colours)
                   if single_row in results[f"single {c} {s}"]]
        joint = {s: results[f"joint {concept} {s}"][row] for s in seeds}
        worst = min(joint, key=joint.get)
        stacked = [results[f"stacked {concept} {s}"][row] for s in seeds] if len(colours) == 2 else []
        print(f"| {row} | {results['original'][row]} | {pooled(singles) if singles else '-'} | "
              f"**{pooled(joint.values())}** | {pooled(stacked) if stacked else '-'} | {worst}: {joint[worst]} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--colours", nargs="+", default=["red", "blue", "green"],
                   help="toy colours (default red blue green): joint erasers of the first two, then of all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0-2)")
    p.add_argument("--out", default=os.path.join("outputs", "concepts_table"), help="folder for erasers and tables")
    args, extra = p.parse_known_args()  # anything else goes to unlearn.py for the joint erasers: --steps 1000
    if os.path.exists(args.out):
        sys.exit(f"error: {args.out} already exists; choose another --out")
    if len(args.colours) < 2 or not all(c in toy.PALETTE for c in args.colours):
        sys.exit(f"error: --colours takes two or more of {', '.join(toy.PALETTE)}")
    sets = [args.colours[:2]] + ([args.colours] if len(args.colours) > 2 else [])
    start, results, cost = time.time(), {}, {}
    for colours in sets:
        results[f"original {', '.join(colours)}"] = judge(None, ", ".join(colours))
    for s in args.seeds:
        for c in args.colours:
            folder = os.path.join(args.out, f"{c}_{s}")
            cost[f"{c} {s}"] = train(folder, [c], s)
            results[f"single {c} {s}"] = judge(folder, c)
        for colours in sets:
            concept, folder = ", ".join(colours), os.path.join(args.out, f"{'_'.join(colours)}_{s}")
            cost[f"{concept} {s}"] = train(folder, colours, s, extra)
            results[f"joint {concept} {s}"] = judge(folder, concept)
            if len(colours) == 2:
                results[f"stacked {concept} {s}"] = judge([os.path.join(args.out, f"{c}_{s}") for c in colours],
                                                          concept)
        print(f"seed {s} done at {int(time.time() - start)} s", flush=True)
    seconds = int(time.time() - start)
    for colours in sets:
        concept = ", ".join(colours)
        print_table(colours, dict(results, original=results[f"original {concept}"]), args.seeds)
        runs = {"one colour": [cost[f"{c} {s}"] for c in args.colours for s in args.seeds],
                f"{len(colours)} colours": [cost[f"{concept} {s}"] for s in args.seeds]}
        for name, rs in runs.items():
            pool, steps = (sum(r[k] for r in rs) / len(rs) for k in ("x_t pool", "unlearning"))
            print(f"{name}: x_t pool {pool:.0f} s, 500 steps {steps:.0f} s ({1000 * steps / 500:.0f} ms a step)")
    print("\nk/n videos pooled over seeds, the share, its 95 % Wilson interval over videos (the seeds' videos "
          f"counted as independent); CPU, float32. {len(args.seeds)} seeds in {seconds} s "
          f"({seconds // 60} min {seconds % 60} s)")
    with open(os.path.join(args.out, "concepts_table.json"), "w") as f:
        json.dump({"colours": args.colours, "seeds": args.seeds, "extra": extra, "seconds": seconds, "cost": cost,
                   "results": {k: {row: r.as_dict() for row, r in t.items()} for k, t in results.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
