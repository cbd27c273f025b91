"""The README's results table on the toy: erasing a colour at training seeds 0-4, every eraser judged on the
toy's test set, as the mean and the range over the seeds.

    python docs/seed_table.py                           # red, seeds 0-4, about 12 minutes on 2 cores
    python docs/seed_table.py --concept blue --seeds 0 1 2
    python docs/seed_table.py --dtype bfloat16          # trained and used in bf16 (on a CPU too)

For each seed it runs the README's two commands, `python unlearn.py --model toy --concept C --seed S` and
`python sample.py --model toy --eraser ... --eval toy --steps 20 --seed 11`, into --out (default
outputs/seed_table_<concept>, which must not exist yet), then prints one markdown table: the original
model and the negative prompt (the same for every seed: only the eraser changes) and the erased model,
its videos of all seeds pooled, the range over the seeds, and the worst seed of each row; every count
with its 95 % interval over videos.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from videos import Rate  # noqa: E402

HERE = sys.path[0]


def print_table(tables, concept, seeds):
    """{seed: eval_toy.json's results} as one markdown table; every cell k/n videos, the share, its 95 % interval."""
    first = tables[seeds[0]]
    cell = lambda r: str(Rate(r["count"], r["of"]))  # noqa: E731
    print(f"\n| videos ({concept}) | original | negative prompt | erased, seeds {seeds[0]}-{seeds[-1]} pooled | "
          "range over seeds | worst seed |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in first["erased"]:
        erased = {s: t["erased"][row] for s, t in tables.items()}
        shares = {s: 100 * r["rate"] for s, r in erased.items()}
        worst = min(shares, key=shares.get)
        pooled = Rate(sum(r["count"] for r in erased.values()), sum(r["of"] for r in erased.values()))
        print(f"| {row} | {cell(first['original'][row])} | {cell(first['negative prompt'][row])} | **{pooled}** | "
              f"{min(shares.values()):.0f}-{max(shares.values()):.0f} % | {worst}: {cell(erased[worst])} |")
    print("\nk/n videos, the share, its 95 % Wilson interval over videos; the pooled interval counts the seeds' "
          "videos as independent (they share prompts and seeds), so it is narrower than a new prompt set's")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="red", help="a toy colour (default red)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (default 0-4)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="for training and sampling")
    p.add_argument("--out", default=None, help="folder for the erasers and tables (default outputs/seed_table_C)")
    args, extra = p.parse_known_args()  # anything else goes to unlearn.py, e.g. --batch-size 1
    out = args.out or os.path.join("outputs", f"seed_table_{args.concept}" + (f"_{args.dtype}" if args.dtype else ""))
    if os.path.exists(out):
        sys.exit(f"error: {out} already exists; choose another --out")
    dtype = ["--dtype", args.dtype] if args.dtype else []
    start, tables = time.time(), {}
    for seed in args.seeds:
        eraser, evaluation = os.path.join(out, f"eraser_{seed}"), os.path.join(out, f"eval_{seed}")
        for cmd in (["unlearn.py", "--model", "toy", "--concept", args.concept, "--seed", str(seed),
                     "--output-dir", eraser, *dtype, *extra],
                    ["sample.py", "--model", "toy", "--eraser", eraser, "--eval", "toy", "--steps", "20",
                     "--seed", "11", "--out", evaluation, *dtype]):
            print("$ python " + " ".join(cmd), flush=True)
            done = subprocess.run([sys.executable, *cmd], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
            if done.returncode:
                sys.exit(f"error: that command failed:\n{done.stderr[-2000:]}")
        with open(os.path.join(evaluation, "eval_toy.json")) as f:
            tables[seed] = json.load(f)["results"]
    seconds = int(time.time() - start)
    print_table(tables, args.concept, args.seeds)
    print(f"{len(args.seeds)} seeds in {seconds} s ({seconds // 60} min {seconds % 60} s)")
    with open(os.path.join(out, "seed_table.json"), "w") as f:
        json.dump({"concept": args.concept, "seeds": args.seeds, "dtype": args.dtype, "extra": extra,
                   "seconds": seconds, "tables": tables}, f, indent=2)


if __name__ == "__main__":
    main()
