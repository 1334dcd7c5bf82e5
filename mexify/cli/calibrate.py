"""`mexify calibrate` (in progress)."""


def register(app):
    pass
