"""Python `run("true")` round trip against the Rust API's, on one sandbox, interleaved.

Run by `make bench` with the freshly built wheel installed in .venv-bench. Batches of Python
calls alternate with batches of Rust API calls on the same sandbox (`smolvm bench --run-on`),
in ABBA order, so that both see the same host: this host's speed drifts by more than the
difference measured.
"""

import json
import statistics
import subprocess
import sys
import time

from smolvm import SmolVM

BATCHES = 10
PER_BATCH = 40


def main() -> int:
    results, smolvm_bin = sys.argv[1], sys.argv[2]
    py, rust = [], []
    with SmolVM() as vm:
        for _ in range(20):
            vm.run("true")
        def python_batch():
            for _ in range(PER_BATCH):
                t = time.perf_counter()
                vm.run("true")
                py.append((time.perf_counter() - t) * 1000)

        def rust_batch():
            out = subprocess.run(
                [smolvm_bin, "bench", "--run-on", vm.vm_id, "--rounds", str(PER_BATCH)],
                capture_output=True, text=True, check=True,
            )
            rust.extend(json.loads(out.stdout))

        # ABBA order: a host that is still settling (the measurements before this one start and
        # stop dozens of sandboxes) slows whichever side goes first; alternating cancels that.
        for i in range(BATCHES):
            for batch in (python_batch, rust_batch) if i % 2 == 0 else (rust_batch, python_batch):
                batch()
    p50, rust_p50 = statistics.median(py), statistics.median(rust)
    ratio = p50 / rust_p50
    data = json.load(open(results + "/latest.json"))
    data["python_run_true_ms"] = {"p50": p50, "rust_p50": rust_p50, "ratio": ratio, "target_ratio": 1.05}
    json.dump(data, open(results + "/latest.json", "w"), indent=2)
    with open(results + "/latest.md", "a") as md:
        md.write(
            f"| Python `vm.run(\"true\")`, p50 (interleaved with the Rust API on one sandbox) | {p50:.2f} ms "
            f"| Rust API {rust_p50:.2f} ms: ratio **{ratio:.2f}** (target <= 1.05) |\n"
        )
    print(f"python run('true') p50 {p50:.2f} ms, rust {rust_p50:.2f} ms, ratio {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
