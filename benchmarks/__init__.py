"""The performance harness: measurements anyone can re-run, never timed tests."""
