# chargegate tasks. `just --list` shows them.

# Run the server on the embedded defaults.
run *ARGS:
    cargo run --release -- {{ARGS}}

# The whole test suite (what CI runs).
test:
    cargo test

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings

# What CI runs, start to end.
ci:
    bash .ci/run

# The full benchmark (11–21 minutes here); writes bench/results/latest.json and .png.
bench:
    cargo build --release --workspace
    target/release/chargegate-bench --json bench/results/latest.json

# Every scenario for a few seconds: proves the benchmark works, measures nothing worth quoting.
bench-quick:
    cargo build --release --workspace
    target/release/chargegate-bench --quick --json target/bench-quick/results.json

# Instructions per Authorize call under callgrind, chargegate and the bare echo server (needs valgrind).
callgrind:
    cargo build --release --workspace
    bench/callgrind.sh echo
    bench/callgrind.sh chargegate
