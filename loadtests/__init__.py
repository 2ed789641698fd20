"""Locust scenarios, the oversell audit and the benchmark."""
