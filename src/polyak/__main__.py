from polyak.cli import main

raise SystemExit(main())
