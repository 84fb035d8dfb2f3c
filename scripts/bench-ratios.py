#!/usr/bin/env python3
"""Prints candidate/baseline ratios from criterion's estimates of this run.

Usage: bench-ratios.py TARGET_DIR GROUP_GLOB BASELINE CANDIDATE GOAL
Exits non-zero when a ratio misses the goal (ratio must be <= GOAL), and when no group matches or a
group lacks either estimate: a benchmark that did not run fails loudly, never passes silently."""
import glob, json, os, sys

target, group_glob, baseline, candidate, goal = sys.argv[1:6]
goal = float(goal)
failed = False
groups = sorted(glob.glob(os.path.join(target, "criterion", group_glob)))
groups = [g for g in groups if os.path.isdir(g) and os.path.basename(g) != "report"]
if not groups:
    sys.exit(f"bench-ratios: no criterion group matches {group_glob!r} under {target}/criterion: did the bench run?")
for group_dir in groups:
    def mean(name):
        path = os.path.join(group_dir, name, "new", "estimates.json")
        try:
            with open(path) as f:
                return json.load(f)["mean"]["point_estimate"]
        except FileNotFoundError:
            sys.exit(f"bench-ratios: {path} is missing: benchmark {name!r} of group "
                     f"{os.path.basename(group_dir)!r} did not run")
    base, cand = mean(baseline), mean(candidate)
    ratio = cand / base
    ok = ratio <= goal
    failed |= not ok
    print(f"{os.path.basename(group_dir):>14}: {baseline} {base/1000:8.2f} us, {candidate} {cand/1000:8.2f} us, "
          f"ratio {ratio:.3f} (goal <= {goal}) {'ok' if ok else 'MISSED'}")
sys.exit(1 if failed else 0)
