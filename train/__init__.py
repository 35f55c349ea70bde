"""Training with accelerate (issue: trainer)."""
