#!/usr/bin/env bash
# Mutation testing with mutmut 3: which small changes of the code do the tests notice?
#
#   scripts/mutation.sh [SOURCE ...] [-- TEST ...]
#
# SOURCE: files of sanity_cli/ to mutate (default: the wiring, where a slip reverses a
#         finding without breaking any number: pipeline/*.py, checks/*.py,
#         randomization.py, runstore.py, runfiles.py, summary.py)
# TEST:   the pytest selection run against each mutant (default: the tests of those
#         modules and the end-to-end ones; tests that start `sanity` in a subprocess
#         are left out, since mutmut's switch between mutants works in its own process)
#
# MUTATION_SAMPLE=N tests a seeded random sample of N mutants (MUTATION_SEED, 0) instead
# of all of them, and prints the score with its 95% interval: all of the default
# sources' mutants take hours on two cores. MUTATION_JOBS: parallel workers (2).
#
# Works on a scratch copy of the repository (.cache/mutation, or $MUTATION_DIR), never
# on the working tree, and prints the score and every surviving mutant with its diff.
# Needs mutmut in the virtual environment (.venv/bin/pip install "mutmut>=3,<4").
# Not part of CI: each mutant reruns the tests that reach the mutated function.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${MUTATION_DIR:-$root/.cache/mutation}
python=$root/.venv/bin/python

sources=() tests=()
while (($#)); do
  if [[ $1 == -- ]]; then shift; tests=("$@"); break; fi
  sources+=("$1"); shift
done
((${#sources[@]})) || sources=(sanity_cli/pipeline/*.py sanity_cli/checks/*.py sanity_cli/randomization.py
                               sanity_cli/runstore.py sanity_cli/runfiles.py sanity_cli/summary.py)
((${#tests[@]})) || tests=(tests/test_checks_e2e.py tests/test_randomization.py tests/test_results.py
                           tests/test_pipeline.py tests/test_chunks.py tests/test_cache_key.py
                           tests/test_settings_reach.py tests/test_limits.py tests/test_verdict.py)

rm -rf "$work" && mkdir -p "$work"
git -C "$root" ls-files -co --exclude-standard | tar -C "$root" -cf - -T - | tar -C "$work" -xf -
indent=$'\n    '
only=$(printf "${indent}%s" "${sources[@]}") selection=$(printf "${indent}%s" "${tests[@]}")
ONLY=$only TESTS=$selection "$python" - "$root/scripts/mutation.cfg" "$work/setup.cfg" <<'PY'
import os, sys
text = open(sys.argv[1]).read().format(only_mutate=os.environ["ONLY"], tests=os.environ["TESTS"])
open(sys.argv[2], "w").write(text)
PY

cd "$work"
# mutants/ must exist before Python starts: a PYTHONPATH folder that is missing at the
# first import is remembered as empty, and the tests would import the original package.
mkdir -p mutants
export PYTHONPATH=$work/mutants OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 SANITY_PROGRESS=0
jobs=${MUTATION_JOBS:-2}
if [[ -n ${MUTATION_SAMPLE:-} ]]; then
  # A first run that matches no mutant generates them all and records which tests reach
  # each function; then the sample is drawn from the generated names.
  "$python" -m mutmut run --max-children "$jobs" "no-such-mutant" >/dev/null 2>&1 || true
  mapfile -t sample < <("$python" - "$MUTATION_SAMPLE" "${MUTATION_SEED:-0}" <<'PY'
import json, pathlib, random, sys
names = sorted(name for meta in pathlib.Path("mutants").rglob("*.meta")
               for name in json.loads(meta.read_text())["exit_code_by_key"])
print(*random.Random(int(sys.argv[2])).sample(names, min(int(sys.argv[1]), len(names))), sep="\n")
PY
  )
  printf '%s\n' "${sample[@]}" > sample.txt
  "$python" -m mutmut run --max-children "$jobs" "${sample[@]}" || true
else
  "$python" -m mutmut run --max-children "$jobs" || true
fi
"$python" - <<'PY'
import collections, math, pathlib, subprocess, sys

def mutmut(*args):
    return subprocess.run([sys.executable, "-m", "mutmut", *args], capture_output=True, text=True).stdout

status = dict(line.strip().rsplit(": ", 1) for line in mutmut("results", "--all", "true").splitlines() if ": " in line)
sample = pathlib.Path("sample.txt")
if sample.exists():
    status = {name: status.get(name, "not checked") for name in sample.read_text().split()}
counts = collections.Counter(status.values())
caught = counts["killed"] + counts["timeout"]  # a mutant that never ends is noticed too
tested = sum(counts[state] for state in ("killed", "timeout", "survived", "suspicious", "segfault"))
print(f"mutants{' (a random sample)' if sample.exists() else ''}: {len(status)}; "
      + ", ".join(f"{state} {n}" for state, n in sorted(counts.items())))
share = caught / max(tested, 1)
# Wilson's 95% interval of the share killed, for a sample
z = 1.96
centre = (share + z * z / (2 * tested)) / (1 + z * z / tested) if tested else 0.0
half = z * math.sqrt(share * (1 - share) / tested + z * z / (4 * tested * tested)) / (1 + z * z / tested) if tested else 0.0
interval = f", 95% interval {centre - half:.1%} to {centre + half:.1%}" if sample.exists() else ""
print(f"score: {caught}/{tested} killed of the mutants that the selected tests reach ({share:.1%}{interval})")
unreached = collections.Counter(name.rsplit("__mutmut_", 1)[0] for name, state in status.items() if state == "no tests")
print("functions no selected test reaches:", ", ".join(sorted(unreached)) or "none")
for name, state in status.items():
    if state in ("survived", "suspicious", "segfault", "not checked"):
        print(f"\n# {name}: {state}\n{mutmut('show', name)}")
PY
