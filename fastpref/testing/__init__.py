"""Offline fixtures for tests and users: tiny random-weight SD1.5/SDXL pipelines
(``tiny_model``, ``fastpref make-tiny-model``) and generated preference pairs in Pick-a-Pic's
schema (``toy_data``, ``fastpref make-toy-data``). Production code never imports this package."""
