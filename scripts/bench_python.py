"""Python `run("true")` round trip against the Rust API's, measured in one run.

Run by `make bench` with the freshly built wheel installed in .venv-bench; the Rust number is
taken from bench/results/latest.json, written moments before by `smolvm bench`.
"""

import json
import statistics
import sys
import time

from smolvm import SmolVM

N = 200


def main() -> int:
    with SmolVM() as vm:
        for _ in range(20):
            vm.run("true")
        samples = []
        for _ in range(N):
            t = time.perf_counter()
            vm.run("true")
            samples.append((time.perf_counter() - t) * 1000)
    p50 = statistics.median(samples)
    results = sys.argv[1]
    data = json.load(open(results + "/latest.json"))
    rust = data["run_true_login_ms"]["p50"]
    ratio = p50 / rust
    data["python_run_true_ms"] = {"p50": p50, "rust_p50": rust, "ratio": ratio, "target_ratio": 1.05}
    json.dump(data, open(results + "/latest.json", "w"), indent=2)
    with open(results + "/latest.md", "a") as md:
        md.write(f"| Python `vm.run(\"true\")`, p50 | {p50:.2f} ms | Rust API {rust:.2f} ms: ratio **{ratio:.2f}** (target <= 1.05) |\n")
    print(f"python run('true') p50 {p50:.2f} ms, rust {rust:.2f} ms, ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
