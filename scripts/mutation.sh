#!/usr/bin/env bash
# Mutation testing with mutmut 3: which small changes of the code do the tests notice?
#
#   scripts/mutation.sh [SOURCE ...] [-- TEST ...]
#
# SOURCE: files of sanity_cli/ to mutate (default: sanity_cli/randomization.py sanity_cli/results.py)
# TEST:   the pytest selection run against each mutant (default: the tests of those modules
#         and the end-to-end checks: tests/test_randomization.py tests/test_results.py
#         tests/test_checks_e2e.py)
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
((${#sources[@]})) || sources=(sanity_cli/randomization.py sanity_cli/results.py)
((${#tests[@]})) || tests=(tests/test_randomization.py tests/test_results.py tests/test_checks_e2e.py)

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
"$python" -m mutmut run --max-children "${MUTATION_JOBS:-2}" || true
"$python" - <<'PY'
import collections, subprocess, sys

def mutmut(*args):
    return subprocess.run([sys.executable, "-m", "mutmut", *args], capture_output=True, text=True).stdout

status = dict(line.strip().rsplit(": ", 1) for line in mutmut("results", "--all", "true").splitlines() if ": " in line)
counts = collections.Counter(status.values())
killed, reached = counts["killed"], sum(n for state, n in counts.items() if state != "no tests")
print(f"mutants: {len(status)}; " + ", ".join(f"{state} {n}" for state, n in sorted(counts.items())))
print(f"score: {killed}/{reached} killed of the mutants that the selected tests reach ({killed / max(reached, 1):.1%})")
unreached = collections.Counter(name.rsplit("__mutmut_", 1)[0] for name, state in status.items() if state == "no tests")
print("functions no selected test reaches:", ", ".join(sorted(unreached)) or "none")
for name, state in status.items():
    if state in ("survived", "timeout", "suspicious", "segfault"):
        print(f"\n# {name}: {state}\n{mutmut('show', name)}")
PY
