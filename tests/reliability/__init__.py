"""Reliability and security under faults and bad input (issue 9): see docs/reliability.md."""
