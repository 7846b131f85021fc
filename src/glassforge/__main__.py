"""`python -m glassforge` (and `torchrun -m glassforge`) enter the same CLI as the console script."""

from glassforge.cli import main

raise SystemExit(main())
