"""Moving bytes as the plan says: split (and resplit from a split folder), merge, verify; the staging that makes
outputs appear whole or not at all, and the worker threads."""
