from mexify.cli import main

main()
