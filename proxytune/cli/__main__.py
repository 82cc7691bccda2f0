from proxytune.cli import main

raise SystemExit(main())
