"""The controller's I/O: the API client, the reconcile loop, leader election, the webhook server."""
