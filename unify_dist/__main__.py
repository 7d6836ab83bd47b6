from unify_dist.app.cli import main

raise SystemExit(main())
