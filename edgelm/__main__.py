"""`python -m edgelm` (and `torchrun -m edgelm train ...`) runs the command line."""

from edgelm.cli import main

raise SystemExit(main())
