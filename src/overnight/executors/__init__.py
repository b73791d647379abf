"""Executors run a candidate's tree under a budget and report what happened."""
