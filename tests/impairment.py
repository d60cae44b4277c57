"""The UDP impairment proxy lives in ``bench/impairment.py`` (packaged, so benchmarks run from
an installed package); tests import it from here as before."""

from bench.impairment import LOCALHOST, Impairment, ImpairmentProxy

__all__ = ["LOCALHOST", "Impairment", "ImpairmentProxy"]
