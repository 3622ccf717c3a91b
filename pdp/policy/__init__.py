"""Rego policies: the engines, the input document, the result shape, the load-time probe, the test runner."""

import os

# regorus reports an evaluation error with a Rust backtrace when RUST_BACKTRACE is set in the environment,
# and symbolising one costs milliseconds and some 60 MiB kept for good: a policy error on every request
# would pay it each time. pdp shows only the error; RUST_LIB_BACKTRACE=1 brings the backtraces back.
os.environ.setdefault("RUST_LIB_BACKTRACE", "0")
