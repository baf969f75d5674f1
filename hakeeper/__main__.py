from hakeeper.cli.main import main

main()
