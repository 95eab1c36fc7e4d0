# smolvm: `make run` prepares everything and boots a first sandbox; `make test` runs all tests.
CARGO ?= cargo
MUSL  := x86_64-unknown-linux-musl
AGENT := target/$(MUSL)/release/smolvm-agent

.PHONY: run test prereqs agent build image lint bench clean

prereqs:
	./scripts/prereqs.sh

# The guest agent: a static musl binary (it is /init of the default image).
agent:
	$(CARGO) build --release -p smolvm-agent --target $(MUSL)

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

test: prereqs agent
	$(CARGO) build -p smolvm-cli
	./target/debug/smolvm image build
	$(CARGO) test --workspace
	$(MAKE) lint

bench: build
	./scripts/bench.sh

clean:
	$(CARGO) clean
