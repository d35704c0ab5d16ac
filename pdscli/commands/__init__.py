"""One module per `pds` command; each registers itself on `pdscli.cli.app`."""
