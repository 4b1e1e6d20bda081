"""polycommit's own tooling: the CLI, the servers it runs, its worker processes, demo, benchmark and checker.

An application that uses polycommit as a library imports none of this; the tooling imports the library,
the store consumers and the orchestrator, never the other way round.
"""
