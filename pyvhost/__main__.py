from pyvhost.cli import main

raise SystemExit(main())
