"""Datasets: readers for standard formats and a generated toy task (``synthetic``)."""
