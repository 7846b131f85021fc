"""The built-in recipes (`tiny`, `default`, `gpu-small`) as package data: TOML files read by core.recipe."""
