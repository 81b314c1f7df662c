from cfkit.cli import main

raise SystemExit(main())
