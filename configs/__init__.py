"""The shipped training configs (YAML), installed as package data: ``importlib.resources.files("dit.configs")``."""
