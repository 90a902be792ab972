"""Training: one loop for every method (trainer), per-method recipes, evaluation."""
