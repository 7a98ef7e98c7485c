"""Evaluation: scoring replies against held-out College Scorecard answers, and the HTML/JSON report."""
