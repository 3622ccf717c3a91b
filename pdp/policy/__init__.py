"""Rego policies: the engines, the input document, the result shape, the load-time probe, the test runner."""
