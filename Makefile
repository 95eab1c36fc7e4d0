# smolvm: `make run` prepares everything and boots a first sandbox; `make test` runs all tests.
CARGO ?= cargo
# The guest agent's target: musl where rustup has it, else glibc linked statically (where no
# target can be fetched; prereqs.sh says so). Decided when used, after prereqs has run.
AGENT_TARGET = $(shell rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl && echo x86_64-unknown-linux-musl || echo x86_64-unknown-linux-gnu)
AGENT = target/$(AGENT_TARGET)/release/smolvm-agent

.PHONY: run test test-rust test-python prereqs agent build image lint bench wheel venv clean

prereqs:
	./scripts/prereqs.sh

# The guest agent: a static binary (it is /init of the default image). Whole-program LTO (this
# build only; it names its target, so the host crates are not rebuilt): 20 % less code, which a
# cold guest pays for in page faults and TCG translation on the way to its first command.
agent:
	CARGO_PROFILE_RELEASE_LTO=true CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
	  $(if $(findstring gnu,$(AGENT_TARGET)),RUSTFLAGS="-C target-feature=+crt-static") \
	  $(CARGO) build --release -p smolvm-agent --target $(AGENT_TARGET)

build: agent
	$(CARGO) build --release -p smolvm-cli
	cp $(AGENT) target/release/smolvm-agent

# Builds the guest kernel once (a few minutes, cached by fingerprint) and the initramfs.
image: build
	./target/release/smolvm image build

run: prereqs image
	./target/release/smolvm run "echo hello from a microVM"

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

test: prereqs agent test-rust test-python lint

test-rust:
	$(CARGO) build -p smolvm-cli
	./target/debug/smolvm image build
	$(CARGO) test --workspace

# The Python package: a wheel with the native module, the smolvm CLI and the guest agent.
PYBIN := crates/smolvm-py/python/smolvm/bin
VENV  := .venv

venv:
	test -x $(VENV)/bin/pip || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check "maturin>=1.5,<2" pytest

wheel: build venv
	mkdir -p $(PYBIN)
	cp target/release/smolvm $(AGENT) $(PYBIN)/
	rm -rf dist && $(VENV)/bin/maturin build --release -q -m crates/smolvm-py/Cargo.toml -o dist

# Installs the wheel into a fresh venv and runs the Python suite against it.
test-python: wheel
	rm -rf $(VENV)-test && python3 -m venv $(VENV)-test
	$(VENV)-test/bin/pip install -q --disable-pip-version-check pytest dist/*.whl
	cd crates/smolvm-py/tests && ../../../$(VENV)-test/bin/python -m pytest -q

bench: prereqs build wheel
	./scripts/bench.sh

clean:
	$(CARGO) clean
