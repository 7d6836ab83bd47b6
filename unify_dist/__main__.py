from unify_dist.app.cli import program

raise SystemExit(program())
