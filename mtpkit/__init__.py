"""mtpkit: distill, export and run Gemma-style multi-token-prediction drafters.

`mtpkit.load(...)` (see mtpkit.api) is imported lazily so `import mtpkit` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("load", "Session", "Result", "Stats"):
        from mtpkit import api
        return getattr(api, name)
    raise AttributeError(name)
