"""The `mergelab` command: `main.py` sets process-wide policy and dispatches; one module per command group."""
