"""Training recipes shipped with mexify (YAML files), installed as ``mexify.recipes``."""
