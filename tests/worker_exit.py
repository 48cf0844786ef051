"""How the torch.distributed worker scripts end: a failure exits 1 with its traceback, and
success skips interpreter teardown (gloo's C++ statics can abort at exit once the peer is
gone)."""

import os
import sys
import traceback


def run(main) -> None:
    try:
        main()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)
