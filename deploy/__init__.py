"""``python -m deploy`` (the hello world's deploy command, kept at the top of the repository)."""
