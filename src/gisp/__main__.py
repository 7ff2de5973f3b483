from gisp.cli import main

main()
