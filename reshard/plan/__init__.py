"""The plan: each tensor's cut (build), and the one walk over a cut's ranges (cut). Pure: no I/O."""
