from unify_dist.cli import main

raise SystemExit(main())
