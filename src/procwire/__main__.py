from procwire.cli import main

main()
