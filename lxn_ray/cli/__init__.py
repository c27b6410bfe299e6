"""The command line: what every command shares, and one module per command with its flags and summary."""
