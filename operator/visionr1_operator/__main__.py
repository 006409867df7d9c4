"""``python -m visionr1_operator``: the cluster operator (see ``cluster/__main__.py``)."""

from .cluster.__main__ import main

if __name__ == "__main__":
    raise SystemExit(main())
