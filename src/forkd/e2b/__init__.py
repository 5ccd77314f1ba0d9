"""An E2B-compatible surface over the same Controller (``forkd-controller serve --e2b-bind``): the
control plane (``/sandboxes``, ``/v2/sandboxes``), envd (Connect-protocol processes and filesystem,
``/files``, ``/health``) and the code interpreter's ``/execute``, on one port, routed by the
``E2b-Sandbox-Id`` / ``E2b-Sandbox-Port`` headers. See docs/e2b.md."""
