from vdiskfs.cli import main

raise SystemExit(main())
