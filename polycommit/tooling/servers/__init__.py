"""The local servers polycommit runs against, one module each, on shared process plumbing (`process`).

`polycommit.tooling.services` is the public face: start, stop, probe, reset and the `scripts/services` CLI.
"""
