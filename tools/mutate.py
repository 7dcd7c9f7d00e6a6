#!/usr/bin/env python3
"""Mutation testing: plant one small bug at a time and check that the tests that own the code
notice it.

Each mutant (tools/mutants.py) is an exact snippet of one source file and its replacement, with
the tests that own that code. The harness copies the repository's files (tracked and untracked,
not ignored) into a scratch tree under build/mutate/, builds pagedlm._C there CPU-only in a
build folder it keeps (so a C++ mutant recompiles one file and relinks), then for each mutant:
restores every file it touched before, applies the patch, rebuilds if C++ changed, and runs the
owning tests with -x and a timeout, the scratch tree's python/ first on the import path. A
mutant is killed when a test fails (the harness names the first), or the run times out; it
survives when every owning test passes. Owning tests are pytest node ids or files, or
`cpp:FILTER`, which runs the C++ unit tests (tests/cpp) with that --gtest_filter.

Before any mutant it runs every owning test of the selection on the unmutated tree: a test that
already fails would "kill" every mutant, so the harness stops. Mutants with an `equivalent`
argument are applied and run all the same (a kill shows the argument wrong) but leave the
kill rate's denominator when they survive.

  tools/mutate.py              every mutant
  tools/mutate.py --quick      the fixed CI sample (QUICK in tools/mutants.py)
  tools/mutate.py --only NAME  one mutant (repeatable; a module name selects its mutants)
  tools/mutate.py --list       names, modules and owning tests

Exit status: 0 when every non-equivalent mutant of the selection is killed, 1 otherwise, 2 on
a broken baseline or a snippet that no longer matches its file.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from mutants import MUTANTS, QUICK  # noqa: E402

WORK = ROOT / "build" / "mutate"
TREE = WORK / "tree"
BUILD = WORK / "cmake"
CPP_SUFFIXES = {".cpp", ".h", ".cc", ".hpp", ".cu", ".cuh"}


def python_exe():
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def run(cmd, cwd=None, env=None, timeout=None):
    return subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


# ---- the scratch tree ---------------------------------------------------------------------

def source_files():
    out = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout
    return [p for p in out.split("\0") if p and (ROOT / p).is_file()]


def sync_tree():
    """Copies files that differ from the scratch tree's (by content), so unchanged files keep
    their modification times and the build stays incremental."""
    for rel in source_files():
        src, dst = ROOT / rel, TREE / rel
        data = src.read_bytes()
        if not dst.exists() or dst.read_bytes() != data:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)


def restore(rel):
    """The scratch file back to the repository's content, with a fresh modification time so the
    build sees the change back."""
    (TREE / rel).write_bytes((ROOT / rel).read_bytes())


def configure():
    if (BUILD / "build.ninja").exists():
        return
    py = python_exe()
    cmd = ["cmake", "-S", str(TREE), "-B", str(BUILD), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
           "-DPAGEDLM_CUDA=OFF", "-DPAGEDLM_BUILD_PYTHON=ON", "-DPAGEDLM_BUILD_TESTS=ON",
           f"-DPython_EXECUTABLE={py}"]
    env = dict(os.environ, PAGEDLM_CUDA="OFF")
    r = run(cmd, env=env)
    if r.returncode:
        sys.exit(f"mutate: cmake configure failed\n{r.stdout[-4000:]}")


def build(targets=("_C", "test_block_manager")):
    """Builds the extension (and the C++ unit tests) in the kept build folder and links the
    extension into the scratch tree's package. Returns (ok, log)."""
    r = run(["cmake", "--build", str(BUILD), "--target", *targets])
    if r.returncode:
        return False, r.stdout
    built = sorted(BUILD.glob("_C*.so"))
    pkg = TREE / "python" / "pagedlm"
    for old in pkg.glob("_C*.so"):
        old.unlink()
    for so in built:
        (pkg / so.name).symlink_to(so)
    return True, r.stdout


# ---- running the owning tests ---------------------------------------------------------------

def split_tests(tests):
    return [t for t in tests if not t.startswith("cpp:")], [t[4:] for t in tests if t.startswith("cpp:")]


def test_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TREE / "python") + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PAGEDLM_DEBUG", None)
    return env


def run_tests(tests, timeout):
    """(passed, first failing test or None, seconds, log)."""
    py_tests, cpp_filters = split_tests(tests)
    start = time.monotonic()
    deadline = start + timeout
    for f in cpp_filters:
        try:
            r = run([str(BUILD / "tests" / "cpp" / "test_block_manager"), f"--gtest_filter={f}"],
                    timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False, f"cpp:{f} (timeout)", time.monotonic() - start, ""
        if r.returncode:
            failed = re.findall(r"\[  FAILED  \] (\S+)", r.stdout)
            return False, "cpp:" + (failed[0] if failed else f), time.monotonic() - start, r.stdout
    if py_tests:
        cmd = [python_exe(), "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider", "-p", "no:randomly",
               "-W", "ignore::DeprecationWarning", *py_tests]
        try:
            r = run(cmd, cwd=TREE, env=test_env(), timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False, "timeout", time.monotonic() - start, ""
        if r.returncode == 5:
            return False, "no tests collected", time.monotonic() - start, r.stdout
        if r.returncode:
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
            name = failed[0] if failed else "pytest exit %d" % r.returncode
            return False, name, time.monotonic() - start, r.stdout
    return True, None, time.monotonic() - start, ""


# ---- mutants ------------------------------------------------------------------------------

def check_snippets(mutants):
    bad = []
    for m in mutants:
        text = (ROOT / m.file).read_text()
        count = text.count(m.original)
        if count != 1:
            bad.append(f"{m.name}: the snippet occurs {count} times in {m.file}")
        if m.original == m.replacement:
            bad.append(f"{m.name}: replacement equals the original")
    return bad


def select(args):
    if args.only:
        names = set(args.only)
        chosen = [m for m in MUTANTS if m.name in names or m.module in names]
        unknown = names - {m.name for m in chosen} - {m.module for m in chosen}
        if unknown:
            sys.exit(f"mutate: unknown mutant or module: {', '.join(sorted(unknown))}")
        return chosen
    if args.quick:
        by_name = {m.name: m for m in MUTANTS}
        return [by_name[n] for n in QUICK]
    return list(MUTANTS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the fixed CI sample")
    ap.add_argument("--only", action="append", metavar="NAME", help="a mutant or a module (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per mutant's test run (default 180)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run of the owning tests on the clean tree")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the failing output of each kill")
    args = ap.parse_args(argv)

    mutants = select(args)
    if args.list:
        for m in mutants:
            eq = "  [argued equivalent]" if m.equivalent else ""
            print(f"{m.name:32} {m.module:14} {m.file}{eq}\n{'':48}{' '.join(m.tests)}")
        return 0
    bad = check_snippets(MUTANTS)  # all of them, so that a stale snippet shows in any run
    if bad:
        print("mutate: stale mutants:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 2

    t0 = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    sync_tree()
    configure()
    ok, log = build()
    if not ok:
        print(log[-4000:], file=sys.stderr)
        print("mutate: the unmutated tree does not build", file=sys.stderr)
        return 2
    imported = run([python_exe(), "-c", "import pagedlm; print(pagedlm.__file__)"], cwd=TREE, env=test_env())
    if not imported.stdout.strip().startswith(str(TREE)):
        # An editable install's import hook comes before PYTHONPATH: every mutant would "survive".
        print(f"mutate: the tests would import pagedlm from {imported.stdout.strip() or '(nowhere)'}, not from the "
              f"scratch tree {TREE}; install pagedlm as a wheel (tools/test.sh does), not editable", file=sys.stderr)
        return 2
    if not args.no_baseline:
        union = list(dict.fromkeys(t for m in mutants for t in m.tests))
        passed, failed, secs, log = run_tests(union, timeout=max(args.timeout, 900))
        print(f"baseline: {len(union)} owning test ids on the unmutated tree "
              f"{'pass' if passed else 'FAIL: ' + str(failed)} ({secs:.0f} s)", flush=True)
        if not passed:
            print(log[-4000:], file=sys.stderr)
            return 2

    results = []
    dirty = set()
    try:
        for i, m in enumerate(mutants, 1):
            for rel in dirty:
                restore(rel)
            dirty = {m.file}
            path = TREE / m.file
            path.write_text(path.read_text().replace(m.original, m.replacement, 1))
            is_cpp = pathlib.Path(m.file).suffix in CPP_SUFFIXES
            start = time.monotonic()
            if is_cpp:
                ok, log = build()
                if not ok:  # a mutant that does not compile is no test of the tests
                    results.append((m, "stillborn", "does not compile", time.monotonic() - start))
                    print(f"[{i}/{len(mutants)}] {m.name}: does not compile", flush=True)
                    continue
            passed, failed, secs, log = run_tests(m.tests, args.timeout)
            secs = time.monotonic() - start
            verdict = "survived" if passed else "killed"
            results.append((m, verdict, failed, secs))
            tag = verdict if passed or not m.equivalent else "killed (argued equivalent!)"
            print(f"[{i}/{len(mutants)}] {m.module}/{m.name}: {tag}"
                  f"{'' if passed else ' by ' + failed} ({secs:.0f} s)", flush=True)
            if args.verbose and not passed:
                print("    " + "\n    ".join(log.strip().splitlines()[-15:]))
    finally:
        for rel in dirty:
            restore(rel)
        if any(pathlib.Path(r).suffix in CPP_SUFFIXES for r in dirty):
            build()

    print(report(results))
    print(f"total time {time.monotonic() - t0:.0f} s")
    return 0 if all(v != "survived" or m.equivalent for m, v, _, _ in results) else 1


def report(results):
    table = collections.OrderedDict()
    for m, verdict, _, _ in results:
        row = table.setdefault(m.module, collections.Counter())
        row[verdict] += 1
        if verdict == "survived" and m.equivalent:
            row["equivalent"] += 1
    lines = ["", f"{'module':16}{'mutants':>8}{'killed':>8}{'equiv.':>8}{'survived':>9}{'kill rate':>11}"]
    total = collections.Counter()
    for module, row in table.items():
        n = sum(row[v] for v in ("killed", "survived", "stillborn"))
        live = row["survived"] - row["equivalent"]
        rate = row["killed"] / (row["killed"] + live) if row["killed"] + live else 1.0
        lines.append(f"{module:16}{n:8}{row['killed']:8}{row['equivalent']:8}{live:9}{rate:10.0%}")
        total.update(row)
    live = total["survived"] - total["equivalent"]
    n = sum(total[v] for v in ("killed", "survived", "stillborn"))
    rate = total["killed"] / (total["killed"] + live) if total["killed"] + live else 1.0
    lines.append(f"{'all':16}{n:8}{total['killed']:8}{total['equivalent']:8}{live:9}{rate:10.0%}")
    survivors = [m.name for m, v, _, _ in results if v == "survived" and not m.equivalent]
    if survivors:
        lines.append("surviving: " + ", ".join(survivors))
    stillborn = [m.name for m, v, _, _ in results if v == "stillborn"]
    if stillborn:
        lines.append("do not compile (fix the mutant): " + ", ".join(stillborn))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
