from forkd.daemon.main import main

main()
