"""Training: built-in tasks and user data, objectives, the loop of ``deltatune train``."""
