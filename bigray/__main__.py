from bigray.cli import main

raise SystemExit(main())
