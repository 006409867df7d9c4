"""The cluster operator: kopf handlers (thin), the controller (I/O), the reconcile (pure
decisions), Kubernetes objects built from a stage plan (``jobs``, ``pods``, ``naming``) and
read back (``observe``), the API client, progress scraping, status patches and metrics.
``python -m visionr1_operator`` runs it."""
