"""The run config's sections, one module per area, each next to what it configures: its keys with their help,
range and valid names, and its own rules (`check`). They import only rlpost.schema, never torch or a role, so
that loading and checking a config imports nothing heavy; a role that reads a key's valid names (ENGINES,
DTYPES, ...) imports them from here. rlpost/config.py assembles the sections into `Config`.
"""
