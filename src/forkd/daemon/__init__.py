"""forkd-controller: the daemon that owns snapshots and sandboxes and serves the REST API."""
