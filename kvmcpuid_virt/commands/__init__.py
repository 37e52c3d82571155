"""One module per `kvmcpuid` subcommand: add_parser(subparsers) and run(args)."""
