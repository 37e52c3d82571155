"""`python -m kvmcpuid_virt.cli ARGS`: the `kvmcpuid` command."""

import sys

from kvmcpuid_virt.cli import main

sys.exit(main())
