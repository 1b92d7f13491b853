"""Everything about Optuna studies (filled in by the redesign)."""
