from pcocc.cli.core import main

main()
