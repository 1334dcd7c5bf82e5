"""`mexify inspect` (in progress)."""


def register(app):
    pass
