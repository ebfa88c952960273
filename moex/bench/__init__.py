"""Timing and memory measurement helpers shared by the experiment scripts."""
