from parent_app.main import main

raise SystemExit(main())
