"""The command lines: ``python -m deploy`` (:mod:`tdask.cli.deploy`) and ``python -m tdask.client``."""
