"""``python -m visionr1_operator``: the cluster operator (see ``cluster/__main__.py``)."""

import os
import sys

from .cluster.login import choose_login

# Before kopf is imported: without the kubernetes client where kopf logs in alike (cluster/login.py).
LEAN = choose_login(sys.argv[1:], os.environ)

from .cluster.__main__ import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(lean_login=LEAN))
