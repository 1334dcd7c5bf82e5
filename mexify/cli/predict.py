"""`mexify predict` (in progress)."""


def register(app):
    pass
