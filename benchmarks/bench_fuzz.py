"""Long fuzz of the CLI (issue 8.5): damaged model files, plans and calibration archives.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_fuzz.py [--examples 400] [--subprocess 30]

Every case must end with exit code 0 or 2 and, for 2, one ``ampq-pass: error:`` line, never a
traceback. In-process cases run ``ampq_pass.cli.main`` (hypothesis, random seeds: new cases
each run); subprocess cases run ``python -m ampq_pass.cli`` with a 120 s timeout to catch
hangs and crashes below Python (segfaults show as negative exit codes).
Writes benchmarks/results/fuzz.md with the number of cases run and their outcomes.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, given, settings  # noqa: E402

from fuzz_cases import all_cases, check_outcome, run_cli  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=400, help="in-process cases per target")
    ap.add_argument("--subprocess", type=int, default=30, help="subprocess cases per target")
    ap.add_argument("--targets", default="model,plan,calib")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fuzz.md"))
    args = ap.parse_args()
    counts: dict[str, collections.Counter] = {}
    failures: list[str] = []
    seconds: dict[str, float] = {}
    for target, strategy in all_cases().items():
        if target not in args.targets.split(","):
            continue
        counter = counts.setdefault(target, collections.Counter())
        start = time.perf_counter()

        @settings(max_examples=args.examples, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(strategy)
        def run(case):
            with tempfile.TemporaryDirectory(prefix="ampq-fuzz-") as tmp:
                argv = case(Path(tmp))
                try:
                    code, _, err = run_cli(argv)
                except Exception:  # an uncaught exception is a failed case: keep where it came from
                    tb = traceback.format_exc().strip().splitlines()
                    failures.append(f"{target}: {' | '.join(tb[-5:])}")
                    raise
                counter[f"exit {code}"] += 1
                try:
                    check_outcome(code, err, argv)
                except AssertionError as exc:
                    failures.append(f"{target}: {str(exc)[:500]}")
                    raise

        try:
            run()
        except Exception as exc:  # hypothesis re-raises the (shrunk) failing case
            failures.append(f"{target}: {type(exc).__name__}: {str(exc)[:500]}")
        seconds[target] = time.perf_counter() - start

        # a few cases as a user runs them: a fresh interpreter, with a timeout
        sub = collections.Counter()
        start = time.perf_counter()
        examples = []

        @settings(max_examples=max(1, args.subprocess), deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(strategy)
        def collect(case):
            examples.append(case)

        collect()
        for case in examples[: args.subprocess]:
            with tempfile.TemporaryDirectory(prefix="ampq-fuzz-") as tmp:
                argv = case(Path(tmp))
                try:
                    proc = subprocess.run([sys.executable, "-m", "ampq_pass.cli", *argv], cwd=ROOT, text=True,
                                          capture_output=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
                except subprocess.TimeoutExpired:
                    failures.append(f"{target} (subprocess): hang > 120 s: {argv}")
                    sub["hang"] += 1
                    continue
                sub[f"exit {proc.returncode}"] += 1
                try:
                    check_outcome(proc.returncode, proc.stderr, argv)
                except AssertionError as exc:
                    failures.append(f"{target} (subprocess): {str(exc)[:500]}")
        counts[f"{target} (subprocess)"] = sub
        seconds[f"{target} (subprocess)"] = time.perf_counter() - start
        print(target, dict(counter), dict(sub), f"{seconds[target]:.0f}s", flush=True)

    failures = list(dict.fromkeys(failures))
    total = sum(sum(c.values()) for c in counts.values())
    lines = ["# CLI fuzz: damaged models, plans, calibration archives", "",
             f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_fuzz.py --examples {args.examples} "
             f"--subprocess {args.subprocess}`", "",
             "Property: exit code 0 or 2, and with 2 a last stderr line `ampq-pass: error: ...`; never a traceback,",
             "never a hang (subprocess cases: 120 s timeout). Cases come from `tests/fuzz_cases.py` (hypothesis,",
             "random seed per run); the test suite runs a bounded, derandomised version (`tests/test_fuzz.py`).", "",
             "| target | cases | outcomes | seconds |", "|---|---:|---|---:|"]
    for name, c in counts.items():
        lines.append(f"| {name} | {sum(c.values())} | {', '.join(f'{k}: {v}' for k, v in sorted(c.items()))} | "
                     f"{seconds[name]:.0f} |")
    failures = list(dict.fromkeys(failures))  # hypothesis replays a failing case while shrinking it
    lines += ["", f"**{total} cases, {len(failures)} distinct failures.**", ""]
    if failures:
        lines += ["Failures:", ""] + [f"- `{f}`" for f in failures[:20]] + [""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    random.seed()
    sys.exit(main())
