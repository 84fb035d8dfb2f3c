#!/usr/bin/env python3
"""Prints candidate/baseline ratios from criterion's estimates of this run.

Usage: bench-ratios.py TARGET_DIR GROUP_GLOB BASELINE CANDIDATE GOAL
Exits non-zero when a ratio misses the goal (ratio must be <= GOAL)."""
import glob, json, os, sys

target, group_glob, baseline, candidate, goal = sys.argv[1:6]
goal = float(goal)
failed = False
for group_dir in sorted(glob.glob(os.path.join(target, "criterion", group_glob))):
    def mean(name):
        with open(os.path.join(group_dir, name, "new", "estimates.json")) as f:
            return json.load(f)["mean"]["point_estimate"]
    try:
        base, cand = mean(baseline), mean(candidate)
    except FileNotFoundError:
        continue
    ratio = cand / base
    ok = ratio <= goal
    failed |= not ok
    print(f"{os.path.basename(group_dir):>14}: {baseline} {base/1000:8.2f} us, {candidate} {cand/1000:8.2f} us, "
          f"ratio {ratio:.3f} (goal <= {goal}) {'ok' if ok else 'MISSED'}")
sys.exit(1 if failed else 0)
