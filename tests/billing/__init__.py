"""Tests of the money core: prices, periods, budgets, rate limits, spend and alerts."""
