"""`mexify train` (in progress)."""


def register(app):
    pass
