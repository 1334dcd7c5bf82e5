"""`mexify evaluate` (in progress)."""


def register(app):
    pass
