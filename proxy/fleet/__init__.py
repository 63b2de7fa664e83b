"""Fleets: several replicas of one upstream, the choice among them, and admission
when every replica is full."""
