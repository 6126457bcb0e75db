from fastflow.cli.main import main

raise SystemExit(main())
