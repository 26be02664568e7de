"""`python -m stabledrl_cli`: the `stabledrl` command line."""

from stabledrl_cli.cli.app import main

if __name__ == "__main__":
    main()
