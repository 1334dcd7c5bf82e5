"""`mexify bench` (in progress)."""


def register(app):
    pass
