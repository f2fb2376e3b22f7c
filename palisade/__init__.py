"""The `palisade` command line: mounts each package's sub-commands. Nothing imports it."""

__all__: list[str] = []
