"""The local executor: a run's plan as subprocesses on this machine (``executor``), its
terminal display (``display``) and the report written from its outputs (``report``)."""
