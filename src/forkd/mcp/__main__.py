from forkd.mcp.server import main

main()
