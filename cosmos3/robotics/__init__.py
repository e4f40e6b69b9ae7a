"""Robotics: the policy API, environment adapters, rollouts, expert data collection, the policy server."""
