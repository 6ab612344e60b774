"""Shared by every stage, and importing none of them: the recipe and the words the stages report in.

Takes: a recipe file, the flags' values, a user's paths. Gives: a validated, frozen Recipe (`config.py`'s
dataclasses, where every default lives; `recipe_file.py` reads the YAML), the error hierarchy every stage raises
(`errors.py`), where the bundled model and data live and how a path is resolved (`paths.py`), and content sha256s
of files and checkpoints with the cache that memoises them (`hashing.py`). Torch-free.
"""
