"""Runnable examples of unify-dist, each run by tests/test_examples.py (a package, so config `imports`
can name `examples.paper_rules` when run from the repository root)."""
