#!/usr/bin/env bash
# `make bench`: run the benchmark and paste its table into the README between the markers.
set -euo pipefail
cd "$(dirname "$0")/.."
./target/release/smolvm bench --out bench/results
# The Python API against the Rust one, in the same run, from the wheel just built.
rm -rf .venv-bench && python3 -m venv .venv-bench
.venv-bench/bin/pip install -q --disable-pip-version-check dist/smolvm-*.whl
.venv-bench/bin/python scripts/bench_python.py bench/results ./target/release/smolvm
python3 - <<'PY'
import re
md = open("bench/results/latest.md").read().strip()
readme = open("README.md").read()
start, end = "<!-- BENCH -->", "<!-- /BENCH -->"
if start in readme:
    if end in readme:
        readme = re.sub(re.escape(start) + ".*?" + re.escape(end), start + "\n" + md + "\n" + end, readme, flags=re.S)
    else:
        readme = readme.replace(start, start + "\n" + md + "\n" + end)
    open("README.md", "w").write(readme)
PY
