from hakeeper.cli.entry import main

main()
