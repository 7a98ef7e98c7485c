"""Datasets: loaders for user data and the College Scorecard builder."""
