"""`python -m dinrec` is the `dinrec` command (also what `torchrun -m dinrec` runs)."""

from dinrec.cli import main

raise SystemExit(main())
