"""Training: the genetic algorithm that finds fast laps, and (later) the vision model."""
