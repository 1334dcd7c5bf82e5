"""`mexify convert` (in progress)."""


def register(app):
    pass
