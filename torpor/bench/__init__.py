"""``torpor bench …``: measurements that print a table and write JSON (never tests)."""
