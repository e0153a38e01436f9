from mcproxy.ops.cli import main

raise SystemExit(main())
