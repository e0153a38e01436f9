from mcproxy.cli import main

raise SystemExit(main())
