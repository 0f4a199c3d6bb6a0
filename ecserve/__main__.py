from ecserve.cli import main

raise SystemExit(main())
