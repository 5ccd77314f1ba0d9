"""The forkd MCP server (``forkd mcp``, ``forkd-mcp``): tools for agents over the Python SDK.

``server`` builds the MCPServer and its tool registrations, ``tools`` the tools themselves, ``explore``
the fork-run-compare tool, ``calls`` the bounded SDK calls they share, ``output`` the output caps,
``models`` the typed inputs and results, ``backend`` how forkd is reached (a daemon or a private local
one), ``keeper`` the process that stops the private daemon, ``http`` the streamable HTTP transport.
"""
