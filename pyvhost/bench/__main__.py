"""`python -m pyvhost.bench`: the vhost benchmark (pyvhost net vs DPDK's vhost PMD), as
`pyvhost bench`. The in-process ring benchmark is `python -m pyvhost.bench.ring`."""

from pyvhost.bench.vhost import main

raise SystemExit(main())
