from sbir_core.cli import main

raise SystemExit(main())
