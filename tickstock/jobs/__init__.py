"""Backtest jobs: submit, cancel, time out, and route their progress to the user who asked."""
