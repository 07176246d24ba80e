# chargegate tasks. `just --list` shows them.

# Run the server on the embedded defaults.
run *ARGS:
    cargo run --release -- {{ARGS}}

# The whole test suite (what CI runs).
test:
    cargo test

# Formatting and lints, as CI checks them.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# What CI runs, start to end.
ci:
    bash .ci/run
