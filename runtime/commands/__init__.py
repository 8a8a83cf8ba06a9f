"""What is built on a loaded model: validate, benchmark, tune, serve, and the CLI's console, input reader
and PNG writer."""
