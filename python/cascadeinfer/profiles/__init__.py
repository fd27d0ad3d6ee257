"""Cost profiles shipped with the package (JSON files beside this module)."""
