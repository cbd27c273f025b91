"""The README's results table on the toy: erasing a colour at training seeds 0-4, every eraser judged on the
toy's test set, as the mean and the range over the seeds.

    python docs/seed_table.py                           # red, seeds 0-4, about 12 minutes on 2 cores
    python docs/seed_table.py --concept blue --seeds 0 1 2
    python docs/seed_table.py --dtype bfloat16          # trained and used in bf16 (on a CPU too)

For each seed it runs the README's two commands, `python unlearn.py --model toy --concept C --seed S` and
`python sample.py --model toy --eraser ... --eval toy --steps 20 --seed 11`, into --out (default
outputs/seed_table_<concept>, which must not exist yet), then prints one markdown table: the original
model and the negative prompt (the same for every seed: only the eraser changes) and the erased model,
mean [lowest-highest] over the seeds, and the worst seed of each erased row.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    first = tables[args.seeds[0]]
    print(f"\n| share of videos ({args.concept}, seeds {', '.join(map(str, args.seeds))}) | original | "
          "negative prompt | erased: mean [range] | worst seed |")
    print("|---|---:|---:|---:|---:|")
    for row in first["erased"]:
        erased = {s: 100 * t["erased"][row] for s, t in tables.items()}
        worst = min(erased, key=erased.get)
        mean = sum(erased.values()) / len(erased)
        print(f"| {row} | {100 * first['original'][row]:.0f} % | {100 * first['negative prompt'][row]:.0f} % | "
              f"**{mean:.0f} %** [{min(erased.values()):.0f}-{max(erased.values()):.0f}] | {worst} |")
    print(f"\n{len(args.seeds)} seeds in {seconds} s ({seconds // 60} min {seconds % 60} s)")
    with open(os.path.join(out, "seed_table.json"), "w") as f:
        json.dump({"concept": args.concept, "seeds": args.seeds, "dtype": args.dtype, "extra": extra,
                   "seconds": seconds, "tables": tables}, f, indent=2)


if __name__ == "__main__":
    main()
