from mergelab.cli.main import main

main()
