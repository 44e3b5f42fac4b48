"""The generated backdoored task of ``ibau.data.synthetic``, under a short name for the tests."""

from ibau.data.synthetic import *  # noqa: F401,F403
from ibau.data.synthetic import C, K, NOISE, S, TARGET  # noqa: F401
