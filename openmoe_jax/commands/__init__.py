"""The command-line tools (console scripts `openmoe-*`): each parses flags and calls the library.
`cli` is their shared plumbing; only commands import it.
"""
