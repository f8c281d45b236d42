from enclave_app.main import main

raise SystemExit(main())
